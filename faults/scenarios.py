"""The faults, one function each: inject it while a producer publishes; return notes for the line.

Each scenario has its own pipeline (queue, DLQ, sink table, deployment), so its counts
see only its own records. `Suite.run` does what every scenario shares: publish, inject,
wait until settled, re-drive runs that ended Failed or Crashed (as an operator would, and
said on the line), count.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from faults.audit import Observer, Report, count, wait_settled
from faults.producer import Producer, Special
from faults.services import PrivatePostgres, PrivateRabbit
from tests.fixtures.refusal import inbox_refusing
from tests.fixtures.stack import wait_for
from tests.fixtures.supervised import SupervisedStack
from ingest.pipelines import Pipeline

CRASH_HEADER = "x-test-crash"  # the stack runs with INGEST_TEST_CRASH_HEADER set to it
# The longest a scenario may take to drain once its producer is done. prefect_down leaves
# about 110 batches waiting for their flow runs, which the worker's 4 slots then run at 1 to
# 1.5 a second: 2 to 4 minutes alone, 5 with one core busy elsewhere.
SETTLE_SECONDS = 600
PUBLISH_SECONDS = 20
OUTAGE_SECONDS = 5  # broker and database restarts: down this long
CONSUMER_CONNECTIONS = "ingest-consumer"  # how consumers name their connections to the broker


@dataclass
class Suite:
    stack: SupervisedStack
    postgres: PrivatePostgres
    rabbit: PrivateRabbit
    observer: Observer
    pipelines: dict[str, Pipeline]
    records: int

    def ctl(self, *args: str) -> str:
        """supervisorctl of the stack (`ingest ctl`)."""
        result = self.stack.ingest("ctl", *args, timeout=120)
        return (result.stdout + result.stderr).strip()

    def pid(self, program: str) -> int:
        return int(self.ctl("pid", program))

    def inbox(self, pipeline: Pipeline) -> int:
        return self.observer.query("SELECT count(*) FROM inbox WHERE pipeline = %s", (pipeline.name,))[0][0]

    def run(self, name: str, fault: Callable, seconds: float = PUBLISH_SECONDS, copies: int = 1,
            poison: int | None = None, invalid_every: int | None = None, checks: tuple[str, ...] = ()) -> Report:
        """`checks`: notes of the fault that are counts too (the line fails unless they are 0);
        `invalid_every`: every so many records one is published that is not JSON."""
        pipeline = self.pipelines[f"faults_{name}"]
        special = Special(poison, {CRASH_HEADER: "1"}) if poison is not None else None
        invalid = frozenset(range(0, self.records, invalid_every)) if invalid_every else frozenset()
        log_start = self.stack.log_path.stat().st_size
        redelivered = self.redelivered(pipeline)
        producer = Producer(self.rabbit.url, pipeline.name, f"{name}-{uuid.uuid4().hex[:6]}", self.records,
                            seconds, copies, special, invalid).start()
        try:
            notes = fault(self, pipeline, producer) or {}
        finally:
            producer.join()
        wait_settled(self.observer, pipeline, SETTLE_SECONDS)
        notes |= self.redrive(pipeline)
        report = count(self.observer, pipeline, producer,
                       poison={producer.message_id(poison)} if poison is not None else set(),
                       invalid={producer.message_id(i) for i in invalid})
        now = self.redelivered(pipeline)
        notes["redelivered"] = now if now < redelivered else now - redelivered  # a restarted broker counts from 0
        if producer.errors:
            notes["unconfirmed"] = len(producer.errors)
        notes["handled_twice"] = self.handled_twice(pipeline, log_start)
        if exits := self.exits_since(log_start):
            notes["exits"] = exits
        report.counts |= {k: notes.pop(k) for k in checks}
        report.extra |= notes
        return report

    def redrive(self, pipeline: Pipeline) -> dict:
        """Runs that ended Failed or Crashed are retried with `ingest replay runs`, as an operator would."""
        ended = Counter(r["state_name"] for r in self.observer.flow_runs(pipeline)
                        if r["state_type"] in ("FAILED", "CRASHED"))
        if not ended:
            return {}
        result = self.stack.ingest("replay", "runs", "-p", pipeline.name, "--wait", "--timeout", str(SETTLE_SECONDS))
        if result.returncode != 0:
            raise RuntimeError(f"ingest replay runs failed:\n{result.stdout}\n{result.stderr}")
        wait_settled(self.observer, pipeline, SETTLE_SECONDS)
        return {"redriven": "+".join(f"{n}{state}" for state, n in sorted(ended.items()))}

    def redelivered(self, pipeline: Pipeline) -> int:
        """The broker's count of messages delivered again (returned by a consumer that died, or
        nacked). RabbitMQ 3.10 also counts the few messages a quorum queue had set aside for a
        consumer that cancelled but never sent it: a graceful stop may show some."""
        return self.observer.queue(pipeline.queue).get("message_stats", {}).get("redeliver", 0)

    def handled_twice(self, pipeline: Pipeline, offset: int) -> int:
        """Messages a consumer committed that came back and were dropped by the inbox's dedup
        (the consumers' log lines): the work a fault made the consumers do twice."""
        text = self.log_since(offset)
        name = re.escape(pipeline.name)
        return (sum(int(n) for n in re.findall(rf"(\d+) message\(s\) of {name} already in the inbox", text))
                + sum(int(n) for n in re.findall(rf"\({name}\): \d+ records committed, (\d+) duplicate", text)))

    def exits_since(self, offset: int) -> str:
        """Programs that exited (supervisord's log lines), e.g. `consumer-0:3`."""
        exited = Counter(m.group(1) for m in re.finditer(r"exited: (\S+) ", self.log_since(offset)))
        return ",".join(f"{name}:{n}" for name, n in sorted(exited.items()))

    def log_since(self, offset: int) -> str:
        """The stack's log (supervisord's and every program's) from `offset` on."""
        with open(self.stack.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def restore(self) -> None:
        """After a scenario, whatever happened: broker, database and every program up again."""
        if not self.rabbit.running():
            self.rabbit.start()
        if not self.postgres.running():
            self.postgres.start()
        self.ctl("start", "all")
        wait_until(self.stack.ready, 300, "the stack ready again")


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """The tests' poll, more often: faults are timed against what the stack is doing."""
    return wait_for(check, timeout, what, interval=interval)


def into_publishing(suite: Suite, producer: Producer, share: float) -> None:
    """Until `share` of the records are confirmed: the fault comes while records flow."""
    wait_until(lambda: len(producer.confirmed) >= share * producer.count, 300, f"{share:.0%} of the records confirmed")


def restarted(suite: Suite, program: str, old_pid: int) -> bool:
    try:
        return suite.pid(program) not in (0, old_pid)
    except ValueError:  # "ERROR (no such process)" meanwhile
        return False


# --- the scenarios ----------------------------------------------------------------------------


def consumer_kill(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    """SIGKILL a consumer while it has a batch in hand; supervisord restarts it."""
    wait_until(lambda: suite.inbox(pipeline) >= 0.25 * producer.count, 300, "a quarter of the records committed")
    pid = suite.pid("consumer:consumer-0")
    suite.ctl("signal", "KILL", "consumer:consumer-0")
    wait_until(lambda: restarted(suite, "consumer:consumer-0", pid), 120, "supervisord to restart the consumer")
    return {"killed_pid": pid}


def rabbitmq_restart(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    into_publishing(suite, producer, 0.3)
    started = time.monotonic()
    suite.rabbit.stop()
    time.sleep(OUTAGE_SECONDS)
    suite.rabbit.start()
    return {"broker_down_s": round(time.monotonic() - started)}


def postgres_restart(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    wait_until(lambda: suite.inbox(pipeline) >= 0.3 * producer.count, 300, "30% of the records committed")
    started = time.monotonic()
    suite.postgres.stop("fast")
    time.sleep(OUTAGE_SECONDS)
    suite.postgres.start()
    return {"database_down_s": round(time.monotonic() - started)}


PREFECT_DOWN_SECONDS = 60


def prefect_down(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    into_publishing(suite, producer, 0.15)
    suite.ctl("stop", "prefect-server")
    time.sleep(PREFECT_DOWN_SECONDS)
    suite.ctl("start", "prefect-server")
    return {"server_down_s": PREFECT_DOWN_SECONDS}


def worker_kill(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    """SIGKILL the worker while a flow run of this pipeline runs; what becomes of that run?"""
    pid = suite.pid("prefect-worker:prefect-worker-0")
    running = wait_until(lambda: [r for r in suite.observer.flow_runs(pipeline) if r["state_type"] == "RUNNING"],
                         300, "a running flow run", interval=0.05)
    # At once (`supervisorctl signal KILL` takes a second to start): runs last about a second.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: restarted(suite, "prefect-worker:prefect-worker-0", pid), 120, "the worker restarted")
    run_id = running[0]["id"]
    final = wait_until(lambda: next((r["state_name"] for r in suite.observer.flow_runs(pipeline)
                                     if r["id"] == run_id and r["state_type"] not in ("RUNNING", "PENDING",
                                                                                        "SCHEDULED")), None),
                       SETTLE_SECONDS, "the run the kill interrupted to end")
    return {"run_running_at_kill": final}


def poison(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    """The poison message is published with the others (Suite.run); nothing to do but wait."""
    return {}


def same_id(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    """Three producers publish every record with the same message id (Suite.run, copies=3)."""
    return {"copies": producer.copies}


def consumer_stop(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    """`supervisorctl stop` (SIGTERM): the consumer finishes its batches, and nothing it took is
    handled again (`handled_twice`, a check of this scenario, counted by Suite.run)."""
    wait_until(lambda: suite.inbox(pipeline) >= 0.3 * producer.count, 300, "30% of the records committed")
    suite.ctl("stop", "consumer:consumer-0")
    producer.join()  # the other consumer takes the rest
    suite.ctl("start", "consumer:consumer-0")
    return {}


REFUSING_SECONDS = 20


def inbox_refusing_commits(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    """The database refuses every inbox write of this pipeline (a trigger that raises, as a
    revoked privilege would) for 20 s while publishing: consumers hold their batches and retry,
    none exits (`consumer_exits`, a check), and nothing is dead-lettered by the delivery limit."""
    into_publishing(suite, producer, 0.2)
    offset = suite.stack.log_path.stat().st_size
    with inbox_refusing(suite.observer.database_url, pipeline.name) as refusal:
        time.sleep(REFUSING_SECONDS)
    text = suite.log_since(offset)
    refused = text.count(refusal)  # the consumers' log lines of the database's refusals
    if not refused:
        raise RuntimeError("no inbox commit was refused: the fault missed the consumers")
    return {"commits_refused": refused, "consumer_exits": len(re.findall(r"exited: consumer", text))}


def broker_reconnect(suite: Suite, pipeline: Pipeline, producer: Producer) -> dict:
    """The broker closes the consumers' connections three times while they hold batches, good
    and invalid messages among them (Suite.run, invalid_every): they reconnect, leave what they
    had taken to its redelivery, and dead-letter each invalid message once (`dead_twice`)."""
    closed = 0
    for share in (0.25, 0.5, 0.75):
        into_publishing(suite, producer, share)
        closed += suite.rabbit.close_connections(CONSUMER_CONNECTIONS)
    return {"connections_closed": closed}


def scenarios(records: int) -> dict[str, Callable[[Suite], Report]]:
    """Name -> what runs it, in the issue's order."""
    return {
        "consumer_kill": lambda s: s.run("consumer_kill", consumer_kill),
        "rabbitmq_restart": lambda s: s.run("rabbitmq_restart", rabbitmq_restart),
        "postgres_restart": lambda s: s.run("postgres_restart", postgres_restart),
        # Published over the outage and beyond, so records arrive before, during and after it.
        "prefect_down": lambda s: s.run("prefect_down", prefect_down, seconds=PREFECT_DOWN_SECONDS + 30),
        "worker_kill": lambda s: s.run("worker_kill", worker_kill),
        "poison": lambda s: s.run("poison", poison, poison=records // 2),
        "same_id": lambda s: s.run("same_id", same_id, copies=3),
        "consumer_stop": lambda s: s.run("consumer_stop", consumer_stop, checks=("handled_twice",)),
        "inbox_refusing": lambda s: s.run("inbox_refusing", inbox_refusing_commits, checks=("consumer_exits",)),
        "broker_reconnect": lambda s: s.run("broker_reconnect", broker_reconnect, invalid_every=50),
    }
