"""After a fault: wait until the pipeline is settled, then count what the producer's records became.

- lost: confirmed by the broker, but neither stored in the sink nor dead-lettered;
- duplicated: a record key twice in the inbox, or a batch with more than one flow run;
- unexpected: stored (sink or inbox) but never published;
- misdead: dead-lettered although it was a good record (every dead letter but the
  scenario's poison message and the invalid messages it published).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import aio_pika
import httpx
import psycopg
from psycopg import sql

from faults.producer import Producer
from ingest.pipelines import Pipeline
from ingest.waiting import TimedOut, poll

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}  # flow-run state types that are over


@dataclass
class Report:
    counts: dict[str, int]  # lost, duplicated, unexpected, misdead, and a scenario's own checks: all must be 0
    extra: dict = field(default_factory=dict)  # figures shown after the counts

    @property
    def failed(self) -> bool:
        return any(self.counts.values())

    def line(self, scenario: str) -> str:
        return f"{scenario}: " + " ".join(f"{k}={v}" for k, v in (self.counts | self.extra).items())


class Observer:
    """Reads the queues (management API), the DLQ, the ingest database and Prefect's runs."""

    def __init__(self, amqp_url: str, management_url: str, database_url: str, api_url: str,
                 api_auth: tuple[str, str] | None = None):
        """`api_auth`: the Prefect API's user and password, when it requires them."""
        self.amqp_url, self.management_url = amqp_url, management_url
        self.database_url, self.api_url, self.api_auth = database_url, api_url, api_auth

    def query(self, text, params=None) -> list[tuple]:
        with psycopg.connect(self.database_url, connect_timeout=10) as conn:
            return conn.execute(text, params).fetchall()

    def queue(self, name: str) -> dict:
        url = f"{self.management_url}/api/queues/%2F/{quote(name, safe='')}"
        return httpx.get(url, auth=("guest", "guest"), timeout=10).raise_for_status().json()

    def dead_letters(self, pipeline: Pipeline) -> list[tuple[str | None, str | None]]:
        """(message id, reason) of each message in the DLQ, left in place (not acked)."""

        async def browse() -> list:
            connection = await aio_pika.connect(self.amqp_url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(pipeline.dlq, passive=True)
                found = []
                while (message := await queue.get(no_ack=False, fail=False)) is not None:
                    headers = message.headers or {}
                    found.append((message.message_id,
                                  headers.get("x-error-reason") or headers.get("x-first-death-reason")))
                return found  # closing the channel returns them all to the DLQ

        return asyncio.run(browse())

    def flow_runs(self, pipeline: Pipeline) -> list[dict]:
        """Every run of deployment ingest/<pipeline>."""
        runs, body = [], {"flows": {"name": {"any_": ["ingest"]}},
                          "deployments": {"name": {"any_": [pipeline.name]}}, "limit": 200}
        while True:
            page = httpx.post(f"{self.api_url}/flow_runs/filter", json={**body, "offset": len(runs)},
                              auth=self.api_auth, timeout=30).raise_for_status().json()
            runs += page
            if len(page) < 200:
                return runs

    def rescheduled(self, run_id: str) -> bool:
        """Whether consumers scheduled this run again after a dead worker left it Pending."""
        states = httpx.get(f"{self.api_url}/flow_run_states/", params={"flow_run_id": run_id},
                           auth=self.api_auth, timeout=30).raise_for_status().json()
        return any("its worker is gone" in (state.get("message") or "") for state in states)

    def outstanding(self, pipeline: Pipeline) -> str | None:
        """What is still on its way (None once nothing is): queued messages, batches, runs."""
        queue = self.queue(pipeline.queue)
        if queue.get("messages", 1):
            return f"{queue.get('messages')} message(s) in the queue"
        (pending,), = self.query("SELECT count(*) FROM batches WHERE pipeline = %s AND status = 'pending'",
                                 (pipeline.name,))
        if pending:
            return f"{pending} batch(es) without a flow run"
        running = Counter(r["state_name"] for r in self.flow_runs(pipeline) if r["state_type"] not in FINAL)
        if running:
            return f"flow runs not final: {dict(running)}"
        return None


def wait_settled(observer: Observer, pipeline: Pipeline, timeout: float) -> None:
    """Until nothing is outstanding twice in a row (queue statistics lag a second or so)."""
    readings: list[str] = []

    def read() -> list[str]:
        try:
            readings.append(observer.outstanding(pipeline) or "")
        except (httpx.HTTPError, psycopg.Error) as exc:  # a service still coming back
            readings.append(f"{type(exc).__name__}: {exc}")
        return readings[-2:]

    try:
        poll(read, until=lambda last_two: last_two == ["", ""], timeout=timeout, interval=2, what="settled")
    except TimedOut:
        raise TimeoutError(f"not settled after {timeout:.0f}s: {readings[-1]}") from None


def count(observer: Observer, pipeline: Pipeline, producer: Producer, poison: set[str] = frozenset(),
          invalid: set[str] = frozenset()) -> Report:
    """`poison`, `invalid`: message ids that belong in the DLQ (by delivery limit; as refused
    by the contract, each exactly once: `dead_twice` counts those there more than once)."""
    source = producer.source
    stored = {f"{source}-{i}" for (i,) in observer.query(
        sql.SQL("SELECT id FROM {} WHERE source = %s").format(sql.Identifier(pipeline.sink_table)), (source,))}
    inbox = {key.removeprefix("id:") for (key,) in observer.query(
        "SELECT message_key FROM inbox WHERE pipeline = %s", (pipeline.name,))}
    letters = observer.dead_letters(pipeline)
    dead = dict(letters)  # message id -> reason
    (twice_in_inbox,), = observer.query(
        "SELECT count(*) FROM (SELECT 1 FROM inbox WHERE pipeline = %s GROUP BY source, record_id"
        " HAVING count(*) > 1) AS twice", (pipeline.name,))
    runs = observer.flow_runs(pipeline)
    runs_per_batch = Counter(r["parameters"].get("batch_id") for r in runs)
    batches_with_two_runs = sum(1 for n in runs_per_batch.values() if n > 1)
    (batches,), = observer.query("SELECT count(*) FROM batches WHERE pipeline = %s", (pipeline.name,))
    # The poison must be dead-lettered by the broker's delivery limit, not stored nor dropped.
    misrouted = {"poison_not_by_delivery_limit": sum(dead.get(p) != "delivery_limit" for p in poison)} if poison else {}
    if invalid:
        misrouted["dead_twice"] = sum(n > 1 for n in Counter(message_id for message_id, _ in letters).values())
    return Report(
        counts={
            "lost": len(producer.confirmed - stored - set(dead)),
            "duplicated": twice_in_inbox + batches_with_two_runs,
            "unexpected": len((stored | inbox) - producer.attempted),
            "misdead": len(set(dead) - poison - invalid),
            **misrouted,
        },
        extra={
            "attempted": len(producer.attempted), "confirmed": len(producer.confirmed), "stored": len(stored),
            "dead_lettered": len(dead), "batches": batches, "runs": len(runs),
            "run_states": ",".join(f"{k}:{v}" for k, v in sorted(Counter(r["state_name"] for r in runs).items())),
            "rescheduled": sum(observer.rescheduled(r["id"]) for r in runs),
        },
    )
