"""1,000 messages from a plain AMQP client, good and bad mixed, through the real stack."""

from __future__ import annotations

import inspect
import random
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import prefect.server.utilities.messaging.memory
import pytest

from tests.fixtures.stack import Outgoing, completed_task_runs, wait_for

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def envelope(source: str, i: int, occurred: datetime, version: int) -> dict:
    return {
        "id": str(i),
        "source": source,
        "type": "Order.Created",
        "occurred_at": occurred.isoformat().replace("+00:00", "Z"),
        "data": {"version": version, "n": i, "name": "Zoë Ünïcødé ✓ 日本", "nested": {"items": [i, {"x": None}], "ok": True},
                 "amount": 12.5, "big": 12345678901234567890},
        "schema_version": 1,
    }


message = Outgoing


def build_messages(source: str, max_bytes: int):
    """Returns (messages, expected sink data by id, expected dead-letter reasons)."""
    messages, expected = [], {}
    for i in range(600):  # base versions, half with a message id
        body = orjson.dumps(envelope(source, i, T0 + timedelta(seconds=i), 1))
        content_type = "application/json" if i % 3 else None
        messages.append(message(body, f"{source}-{i}" if i % 2 else None, content_type))
        expected[str(i)] = orjson.loads(body)["data"]
    for i in range(100):  # newer versions win
        body = orjson.dumps(envelope(source, i, T0 + timedelta(hours=1), 2))
        messages.append(message(body, f"{source}-{i}-v2" if i % 2 else None))
        expected[str(i)] = orjson.loads(body)["data"]
    for i in range(100, 150):  # older versions never overwrite
        messages.append(message(orjson.dumps(envelope(source, i, T0 - timedelta(hours=1), 0)), f"{source}-{i}-old"))
    for i in range(200, 300):  # exact redeliveries / repeated publishes
        original = messages[i]
        messages.append(message(original.body, original.message_id, original.content_type))
    bad: list[tuple[str, Outgoing]] = []
    bad += [("not_json", message(b'{"id": "x", oops}', f"{source}-bad-json-{k}")) for k in range(30)]
    bad += [("not_utf8", message(b'{"id": "\xff\xfe"}' + bytes([k]), None)) for k in range(20)]
    bad += [("not_object", message(orjson.dumps([source, k]), None)) for k in range(20)]
    for k in range(50):
        broken = envelope(source, 10_000 + k, T0, 1)
        if k % 5 == 0:
            broken["occurred_at"] = "yesterday"
        elif k % 5 == 1:
            broken["id"] = k
        elif k % 5 == 2:
            broken["data"] = "text"
        elif k % 5 == 3:
            broken["extra"] = True
        else:
            del broken["source"]
        bad.append(("invalid", message(orjson.dumps(broken), f"{source}-invalid-{k}")))
    for k in range(15):
        huge = envelope(source, 20_000 + k, T0, 1)
        huge["data"]["blob"] = "x" * (max_bytes + 1)
        bad.append(("too_large", message(orjson.dumps(huge), f"{source}-huge-{k}")))
    bad += [("unsupported_content_type", message(orjson.dumps(envelope(source, 30_000 + k, T0, 1)),
                                                 f"{source}-xml-{k}", "application/xml")) for k in range(15)]
    messages += [m for _, m in bad]
    random.Random(7).shuffle(messages)
    return messages, expected, Counter(reason for reason, _ in bad), bad


def test_thousand_messages_end_up_exactly_once(stack):
    pipeline = stack.pipeline("main")
    source = f"e2e-{uuid.uuid4().hex[:8]}"
    max_bytes = int(stack.env["INGEST_MAX_MESSAGE_BYTES"])
    messages, expected, reasons, bad = build_messages(source, max_bytes)
    assert len(messages) == 1000

    counters = ("ingest_messages_received_total", "ingest_messages_redelivered_total", "ingest_messages_acked_total",
                "ingest_batches_committed_total",
                "ingest_batches_submitted_total", "ingest_commit_to_flow_run_seconds_count")
    metrics_before = {name: stack.metric(name, pipeline=pipeline.name) for name in counters}
    letters_before = {r: stack.metric("ingest_messages_dead_lettered_total", pipeline=pipeline.name, reason=r)
                      for r in reasons}
    batches_before = stack.scalar("SELECT count(*) FROM batches WHERE pipeline = %s", (pipeline.name,))

    started = time.monotonic()
    stack.publish(pipeline.name, messages)
    sink_query = f"SELECT id, data, type, occurred_at FROM {pipeline.sink_table} WHERE source = %s"
    wait_for(lambda: len(stack.query(sink_query, (source,))) == len(expected)
             and stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s AND status <> 'done'",
                              (pipeline.name,)) == 0,
             180, "all valid records stored", stack)
    elapsed = time.monotonic() - started
    print(f"\n1,000 messages: first publish to last stored in {elapsed:.1f}s")

    # The sink: exactly the unique valid records, newest version, data as sent.
    rows = {row[0]: row for row in stack.query(sink_query, (source,))}
    assert set(rows) == set(expected)
    for record_id, data in expected.items():
        assert rows[record_id][1] == data, record_id
    assert {row[2] for row in rows.values()} == {"order.created"}
    assert rows["5"][3] == T0 + timedelta(hours=1)
    assert rows["120"][1]["version"] == 1  # the older version published later lost

    # The inbox: one row per distinct message key (600 + 100 + 50), all done.
    assert stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s AND status = 'done'",
                        (pipeline.name,)) == 750

    # The DLQ: exactly the bad messages, with the right reasons and their properties kept.
    letters = wait_for(lambda: (found := stack.dead_letters(pipeline)) and len(found) >= len(bad) and found,
                       60, "dead letters", stack)
    assert len(letters) == len(bad)
    assert Counter(m.headers["x-error-reason"] for m in letters) == reasons
    assert all(m.headers["x-error"] for m in letters)
    by_id = {m.message_id: m for m in letters if m.message_id}
    assert by_id[f"{source}-xml-3"].content_type == "application/xml"
    assert "occurred_at" in next(m.headers["x-error"] for m in letters
                                 if m.message_id == f"{source}-invalid-0")

    # One flow run per batch, all completed.
    runs = stack.wait_for_runs_final(pipeline)
    batches = stack.query("SELECT batch_id, flow_run_id, status FROM batches WHERE pipeline = %s", (pipeline.name,))
    assert all(status == "submitted" for _, _, status in batches)
    assert sorted(str(r.id) for r in runs) == sorted(str(run_id) for _, run_id, _ in batches)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    assert sum(stack.scalar("SELECT record_count FROM batches WHERE batch_id = %s", (b,)) for b, _, _ in batches) == 750

    # The consumer's metrics count the same: every message delivered once (and any delivered
    # again, which a lost channel would cause), the acks, the dead letters by reason, each
    # batch committed and submitted; the Prefect server serves its own.
    new_batches = len(batches) - batches_before
    delta = {name: stack.metric(name, pipeline=pipeline.name) - before for name, before in metrics_before.items()}
    redelivered = delta.pop("ingest_messages_redelivered_total")
    assert delta.pop("ingest_messages_received_total") - redelivered == 1000
    assert delta == {"ingest_messages_acked_total": 1000 - len(bad),
                     "ingest_batches_committed_total": new_batches, "ingest_batches_submitted_total": new_batches,
                     "ingest_commit_to_flow_run_seconds_count": new_batches}
    assert {r: stack.metric("ingest_messages_dead_lettered_total", pipeline=pipeline.name, reason=r) - before
            for r, before in letters_before.items()} == dict(reasons)
    prefect_metrics = httpx.get(f"{stack.api_url}/metrics", timeout=10)
    assert prefect_metrics.status_code == 200 and "# TYPE" in prefect_metrics.text

    # `ingest status --json` tells the same story.
    status = orjson.loads(stack.ingest("status", "--json", "-p", pipeline.name).stdout)["pipelines"][pipeline.name]
    assert status["queue"]["ready"] == 0
    assert status["dlq"]["ready"] == len(bad) and status["dlq"]["reasons"] == dict(reasons)
    assert status["inbox"]["done"] == 750 and status["inbox"]["failed"] == 0
    assert status["batches"] == {"pending": 0, "submitted": len(batches), "stale": 0}
    assert status["inbox"]["stuck"] == 0
    assert status["runs"] == {"completed": len(runs)}
    assert status["sink"] == {"table": pipeline.sink_table, "records": 600}


@pytest.mark.parametrize("refused", ["numeric_overflow", "nul_in_message_id"])
def test_a_value_postgresql_refuses_is_dead_lettered_and_its_batch_goes_on(stack, refused):
    """1e400000 is valid JSON and passes the contract, but overflows PostgreSQL's numeric. A
    message id may hold U+0000 (AMQP allows any bytes in it), which PostgreSQL's text cannot:
    the check of what it refuses skipped the message key, so the batch's write failed again
    and killed the consumer on every delivery, until the delivery limit took the whole batch."""
    pipeline = stack.pipeline("main")
    source = f"refused-{uuid.uuid4().hex[:8]}"
    good = [Outgoing(orjson.dumps(envelope(source, i, T0, 1)), f"{source}-{i}") for i in range(20)]
    body = orjson.dumps(envelope(source, 99, T0, 1))
    if refused == "numeric_overflow":
        bad = Outgoing(body.replace(b'"amount":12.5', b'"amount":1e400000'), f"{source}-overflow")
    else:
        bad = Outgoing(body, f"{source}-nul\x00id")
    stack.publish(pipeline.name, good[:10] + [bad] + good[10:])
    wait_for(lambda: stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == 20,
             120, "the good records stored", stack)
    letter = wait_for(lambda: next((m for m in stack.dead_letters(pipeline) if m.message_id == bad.message_id),
                                   None), 60, "the refused message dead-lettered", stack)
    assert letter.headers["x-error-reason"] == "invalid"
    assert "PostgreSQL refused it" in letter.headers["x-error"]
    assert stack.scalar("SELECT count(*) FROM inbox WHERE source = %s", (source,)) == 20


def test_the_end_of_a_burst_is_committed_once_nothing_more_arrives(stack):
    """With max_idle_ms the last batch of a burst goes once the stream goes quiet, long
    before its linger (10 minutes here) ends; records arriving together share one batch."""
    pipeline = stack.pipeline("burst")
    source = f"burst-{uuid.uuid4().hex[:8]}"
    stack.publish(pipeline.name, [message(orjson.dumps(envelope(source, i, T0, 1)), f"{source}-{i}")
                                  for i in range(30)])
    wait_for(lambda: stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == 30,
             60, "the burst stored before its linger", stack)
    assert stack.scalar("SELECT count(DISTINCT batch_id) FROM inbox WHERE source = %s", (source,)) == 1


def test_a_lone_record_is_committed_at_once_and_the_next_batch_waits_for_the_budget(stack):
    """With max_runs_per_second a record that finds the budget unspent does not wait out
    its linger (10 minutes here); the batch after it goes no sooner than 1/budget later, its
    flow run started meanwhile."""
    pipeline = stack.pipeline("trickle")
    source = f"trickle-{uuid.uuid4().hex[:8]}"
    stored = f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s"
    stack.publish(pipeline.name, [message(orjson.dumps(envelope(source, 0, T0, 1)), f"{source}-0")])
    wait_for(lambda: stack.scalar(stored, (source,)) == 1, 60, "the lone record stored before its linger", stack)
    stack.publish(pipeline.name, [message(orjson.dumps(envelope(source, i, T0, 1)), f"{source}-{i}")
                                  for i in (1, 2)])
    wait_for(lambda: stack.scalar(stored, (source,)) == 3, 60, "the next records stored before their linger", stack)
    gaps = stack.scalar(
        "SELECT array_agg(extract(epoch FROM created_at) ORDER BY created_at) FROM batches "
        "WHERE batch_id IN (SELECT batch_id FROM inbox WHERE source = %s)", (source,))
    assert len(gaps) >= 2
    assert all(later - earlier >= 0.99 for earlier, later in zip(gaps, gaps[1:])), gaps

    # The batch that waited for the budget had its flow run created, early, as it started to
    # fill: the run waited for the commit instead of the record waiting for the run's start.
    waited, run_id, committed = stack.query(
        "SELECT batch_id, flow_run_id, extract(epoch FROM created_at)::float8 FROM batches "
        "WHERE batch_id IN (SELECT batch_id FROM inbox WHERE source = %s) ORDER BY created_at DESC LIMIT 1",
        (source,))[0]
    run = httpx.get(f"{stack.api_url}/flow_runs/{run_id}", timeout=30).raise_for_status().json()
    assert run["parameters"]["batch_id"] == str(waited) and "commit_deadline" in run["parameters"]
    assert datetime.fromisoformat(run["created"]).timestamp() < committed - 0.3

    # The same messages again: all duplicates, so the batch holds nothing new and its consumer
    # gives it up; its early run ends at once rather than at its deadline (11 s).
    stack.publish(pipeline.name, [message(orjson.dumps(envelope(source, i, T0, 1)), f"{source}-{i}")
                                  for i in (1, 2)])

    def given_up_run():
        rows = stack.query("SELECT flow_run_id FROM batches WHERE pipeline = %s AND record_count = 0",
                           (pipeline.name,))
        runs = [httpx.get(f"{stack.api_url}/flow_runs/{r}", timeout=30).raise_for_status().json() for (r,) in rows]
        return next((r for r in runs if r["state_type"] == "COMPLETED"), None)

    given_up = wait_for(given_up_run, 60, "the duplicates' early run completed", stack)
    assert "given up before its commit" in given_up["state"]["message"]
    assert given_up["total_run_time"] < 5, given_up
    assert stack.scalar(stored, (source,)) == 3


def test_every_record_of_a_burst_has_its_task_run_in_prefect(stack):
    """`record` granularity promises one task run per record in the UI; a burst must not lose any.

    Prefect's server records task runs from their events, through an in-memory queue that
    drops events once it holds 10,000; with its default of one transaction per event it fell
    so far behind a burst like this one that most task runs were never recorded.
    """
    pipeline = stack.pipeline("visible")
    source = f"visible-{uuid.uuid4().hex[:8]}"
    count = 4000
    stack.publish(pipeline.name, [message(orjson.dumps(envelope(source, i, T0, 1)), f"{source}-{i}")
                                  for i in range(count)])
    wait_for(lambda: stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == count,
             240, "the burst stored", stack)
    runs = {"flows": {"name": {"any_": ["ingest"]}}, "deployments": {"name": {"any_": [pipeline.name]}}}
    wait_for(lambda: completed_task_runs(stack.api_url, runs) == count, 120, f"{count} completed task runs in Prefect",
             stack)
    # What Prefect's in-memory event bus logs when it drops an event; the wording is read from
    # the installed Prefect, so that a change of it cannot make this check pass unseen.
    dropped = "Subscription queue is full, dropping message"
    assert dropped in inspect.getsource(prefect.server.utilities.messaging.memory)
    assert dropped not in stack.processes["server"].log_path.read_text(errors="replace")
