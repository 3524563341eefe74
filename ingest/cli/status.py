"""`ingest status`: one snapshot per pipeline of queue, DLQ, inbox, batches, runs and sink.

The JSON shape is a stable monitoring interface:
{"pipelines": {"<name>": {"queue": {"ready", "unacked" (null without the management API), "consumers"},
                           "dlq": {"ready", "reasons": {reason: count},
                                   "reasons_sampled" (only when the DLQ holds more than 10,000
                                   messages: the reasons count its first 10,000)},
                           "inbox": {"pending", "done", "failed", "skipped", "stuck", "rows" (this
                                     pipeline's), "table_bytes" (pg_total_relation_size of the
                                     whole inbox table, all pipelines)},
                           "batches": {"pending", "submitted", "stale"},
                           "runs": {state: count} | {"error": str},
                           "sink": {"table", "records"}}}}
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from ingest.cli.common import PipelineOption, chosen_pipelines, fail
from ingest.pipelines import Pipeline
from ingest.settings import get_settings

if TYPE_CHECKING:
    import aio_pika

DLQ_SCAN_LIMIT = 10_000
RUN_STATES = ("scheduled", "pending", "running", "completed", "failed", "crashed", "cancelled", "cancelling", "paused")


def status(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output (stable shape).")] = False,
    pipeline: PipelineOption = None,
    hours: Annotated[float, typer.Option(help="Count flow runs scheduled in the last N hours.")] = 24,
) -> None:
    """Per pipeline: queue and DLQ depth, inbox, batches, recent flow runs, sink rows."""
    import orjson

    settings, pipelines = get_settings(), chosen_pipelines(pipeline)  # exits 2 on an unknown pipeline
    try:
        snapshot = asyncio.run(collect(settings, pipelines, hours))
    except Exception as exc:
        raise fail(f"{type(exc).__name__}: {exc}")
    typer.echo(orjson.dumps(snapshot, option=orjson.OPT_INDENT_2).decode() if json_output else render(snapshot))


async def _queue_depths(connection: aio_pika.abc.AbstractConnection, pipeline: Pipeline, management_url: str | None,
                        amqp_url: str) -> tuple[dict, dict]:
    async with connection.channel() as channel:
        queue = await channel.declare_queue(pipeline.queue, passive=True)
        ok = queue.declaration_result
        main = {"ready": ok.message_count, "unacked": None, "consumers": ok.consumer_count}
    if management_url:
        main["unacked"] = await _unacked(management_url, amqp_url, pipeline.queue)
    dlq = await _dlq_reasons(connection, pipeline)
    return main, dlq


async def _unacked(management_url: str, amqp_url: str, queue: str) -> int | None:
    """AMQP cannot tell unacknowledged counts; the management API can, when it is enabled."""
    import httpx

    url = httpx.URL(amqp_url)
    vhost = url.path[1:] or "/"
    try:
        async with httpx.AsyncClient(timeout=5, auth=(url.username or "guest", url.password or "guest")) as http:
            response = await http.get(f"{management_url.rstrip('/')}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")
            response.raise_for_status()
            return response.json().get("messages_unacknowledged")
    except (httpx.HTTPError, ValueError):
        return None


async def _dlq_reasons(connection: aio_pika.abc.AbstractConnection, pipeline: Pipeline) -> dict:
    """Browse the DLQ without removing anything: fetch unacked, count, close the channel.

    Closing the channel returns every fetched message to the queue. basic.get fetches one
    message per request, so the broker pushes nothing ahead (there is no prefetch to
    bound), and each message is dropped once its reason is counted: status holds one body
    at a time, whatever the DLQ's size (tests/test_status_dlq.py).
    """
    from consumers.deadletter import dead_letter_reason

    reasons: dict[str, int] = {}
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(pipeline.dlq, passive=True)
        ready = queue.declaration_result.message_count
        for _ in range(min(ready, DLQ_SCAN_LIMIT)):
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                break
            reason = dead_letter_reason(message.headers or {})
            reasons[reason] = reasons.get(reason, 0) + 1
    finally:
        await channel.close()
    result: dict[str, Any] = {"ready": ready, "reasons": reasons}
    if ready > DLQ_SCAN_LIMIT:
        result["reasons_sampled"] = DLQ_SCAN_LIMIT
    return result


def _database_counts(url: str, pipeline: Pipeline) -> dict:
    import psycopg
    from psycopg import sql

    from ingest.inbox import STUCK

    with psycopg.connect(url, connect_timeout=10) as conn:
        inbox = dict.fromkeys(("pending", "done", "failed", "skipped"), 0)
        inbox.update(conn.execute(
            "SELECT status, count(*) FROM inbox WHERE pipeline = %s GROUP BY status", (pipeline.name,)
        ).fetchall())
        inbox["rows"] = sum(inbox.values())
        # The whole table (all pipelines share it), indexes and TOAST included: what
        # inbox_retention_days bounds.
        inbox["table_bytes"] = conn.execute("SELECT pg_total_relation_size('inbox')").fetchone()[0]
        batches = dict.fromkeys(("pending", "submitted"), 0)
        batches.update(conn.execute(
            "SELECT status, count(*) FROM batches WHERE pipeline = %s GROUP BY status", (pipeline.name,)
        ).fetchall())
        # What the scheduled backfill (mode failed) re-drives: see ingest/windows.py.
        inbox["stuck"], batches["stale"] = conn.execute(
            f"""SELECT (SELECT count(*) FROM inbox WHERE pipeline = %(pipeline)s AND {STUCK}),
                       (SELECT count(*) FROM batches WHERE pipeline = %(pipeline)s AND status = 'pending'
                           AND created_at < now() - make_interval(secs => %(stuck)s))""",
            {"pipeline": pipeline.name, "stuck": pipeline.stuck_after_seconds},
        ).fetchone()
        records = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(pipeline.sink_table))
        ).fetchone()[0]
    return {"inbox": inbox, "batches": batches, "sink": {"table": pipeline.sink_table, "records": records}}


async def _run_counts(pipeline: Pipeline, since: datetime) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName, FlowRunFilter,
        FlowRunFilterExpectedStartTime, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    flow_name, deployment_name = pipeline.deployment.split("/")
    async with get_client() as client:
        async def count(state: str) -> int:
            return await client.count_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(state.upper())])),
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=since),
                ),
            )
        counts = await asyncio.gather(*(count(s) for s in RUN_STATES))
    return {s: n for s, n in zip(RUN_STATES, counts) if n}


async def collect(settings, pipelines: list[Pipeline], hours: float) -> dict:
    import aio_pika
    import httpx

    since = datetime.now(timezone.utc) - timedelta(hours=hours)
    out: dict[str, Any] = {"pipelines": {}}
    connection = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": "ingest status"})
    try:
        for pipeline in pipelines:
            entry: dict[str, Any] = {}
            entry["queue"], entry["dlq"] = await _queue_depths(
                connection, pipeline, settings.rabbitmq_management_url, settings.amqp_url
            )
            entry.update(await asyncio.to_thread(_database_counts, settings.database_url, pipeline))
            try:
                entry["runs"] = await _run_counts(pipeline, since)
            except (httpx.HTTPError, OSError, RuntimeError) as exc:
                entry["runs"] = {"error": f"Prefect API unreachable: {exc}"}
            out["pipelines"][pipeline.name] = entry
    finally:
        await connection.close()
    return out


def render(snapshot: dict) -> str:
    """A short human-readable view of `collect()`'s snapshot."""
    lines = []
    for name, p in snapshot["pipelines"].items():
        q, dlq = p["queue"], p["dlq"]
        unacked = "?" if q["unacked"] is None else q["unacked"]
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(dlq["reasons"].items())) or "-"
        runs = p["runs"].get("error") or ", ".join(f"{s} {n}" for s, n in p["runs"].items()) or "-"
        lines += [
            f"pipeline {name}",
            f"  queue    ready {q['ready']}, unacked {unacked}, consumers {q['consumers']}",
            f"  dlq      ready {dlq['ready']} ({reasons})",
            "  inbox    " + ", ".join(f"{s} {n}" for s, n in p["inbox"].items() if s not in ("rows", "table_bytes"))
            + f"; {p['inbox']['rows']} rows (table: {p['inbox']['table_bytes'] / 2**20:.1f} MiB, all pipelines)",
            "  batches  " + ", ".join(f"{s} {n}" for s, n in p["batches"].items()),
            f"  runs     {runs}",
            f"  sink     {p['sink']['table']}: {p['sink']['records']} records",
        ]
    return "\n".join(lines)
