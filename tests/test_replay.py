"""`ingest replay`: failed flow runs retried in bulk, dead letters re-driven, dry runs that change nothing."""

from __future__ import annotations

import hashlib
import re
import uuid

import orjson

from tests.fixtures.stack import Outgoing, wait_for


def envelope(source: str, record_id: str, data: dict | None = None) -> bytes:
    return orjson.dumps({"id": record_id, "source": source, "type": "replay.test",
                         "occurred_at": "2024-05-01T12:00:00Z", "data": data or {"n": record_id}})


def snapshot(stack, pipeline) -> dict:
    """Everything a replay could change: queues, flow runs, inbox, sink."""
    return {
        "queue": stack.queue_depth(pipeline.queue),
        "dlq": stack.queue_depth(pipeline.dlq),
        "runs": sorted((str(r.id), r.state.type.value, r.run_count) for r in stack.flow_runs(pipeline)),
        "inbox": stack.query("SELECT message_key, status, attempts FROM inbox WHERE pipeline = %s ORDER BY 1",
                             (pipeline.name,)),
        "sink": stack.query(f"SELECT source, id, ingested_at FROM {pipeline.sink_table} ORDER BY 1, 2"),
    }


def run_replay(stack, *args: str, code: int = 0) -> str:
    result = stack.replay(*args)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == code, f"replay {' '.join(args)} exited {result.returncode}:\n{out}\n{err}"
    return out


def test_failed_runs_are_retried_in_bulk_once(stack, enrichment_service):
    pipeline = stack.pipeline("replay")
    stack.start("consumer-replay", "consumer", "-p", pipeline.name)
    source = f"replay-{uuid.uuid4().hex[:8]}"
    ids = [f"{source}-{i}" for i in range(12)]
    enrichment_service.fail_with[ids[4]] = 503  # ids are unique to this test: the service is shared
    stack.publish(pipeline.name, [Outgoing(envelope(source, i), i) for i in ids])
    runs = stack.wait_for_runs_final(pipeline)
    failed = [r for r in runs if r.state.is_failed()]
    assert len(failed) == 1 and all(r.state.is_completed() for r in runs if r not in failed), [r.state for r in runs]

    # A dry run lists the failed run and changes nothing; a time window can exclude it.
    before = snapshot(stack, pipeline)
    out = run_replay(stack, "runs", "-p", pipeline.name, "--dry-run")
    assert re.search(rf"would retry +{failed[0].name} +{failed[0].id} +Failed +ingest/{pipeline.name}", out), out
    assert "dry run: would retry 1 of 1 selected runs; nothing changed" in out
    out = run_replay(stack, "runs", "-p", pipeline.name, "--until", "2000-01-01T00:00:00", "--dry-run")
    assert "selected 0 of 0" in out
    assert snapshot(stack, pipeline) == before

    # The service is fixed: the bulk retry runs the same run again, which stores only its failed record.
    enrichment_service.fail_with.pop(ids[4])
    out = run_replay(stack, "runs", "-p", pipeline.name, "--state", "failed", "--state", "Crashed",
                     "--wait", "--timeout", "300")
    assert re.search(rf"retried +{failed[0].name} +{failed[0].id} +Failed -> Scheduled", out), out
    assert "retried 1 of 1 selected runs, 0 failed" in out
    assert "waited for 1 run(s): 1 completed, 0 not completed" in out
    after = {r.id: r for r in stack.flow_runs(pipeline)}
    assert set(after) == {r.id for r in runs}
    assert after[failed[0].id].state.is_completed() and after[failed[0].id].run_count == 2
    assert stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == 12
    assert stack.query("SELECT status, count(*) FROM inbox WHERE pipeline = %s GROUP BY 1", (pipeline.name,)) == [
        ("done", 12)]

    # Twice is harmless: nothing is failed any more, so nothing is selected.
    out = run_replay(stack, "runs", "-p", pipeline.name)
    assert "retried 0 of 0 selected runs, 0 failed" in out
    assert all(r.run_count == (2 if r.id == failed[0].id else 1) for r in stack.flow_runs(pipeline))


def test_replay_refuses_what_it_does_not_know(stack):
    pipeline = stack.pipeline("replay")
    for args in (("runs",), ("runs", "-p", "nope"), ("runs", "-d", "ingest/nope"), ("runs", "-d", "nope"),
                 ("runs", "-p", pipeline.name, "--state", "running"), ("runs", "-p", pipeline.name, "--since", "May"),
                 ("dlq", "-p", pipeline.name, "--reason", "too-large")):
        result = stack.replay(*args)
        assert result.returncode == 2, (args, result.stdout.decode(), result.stderr.decode())
    assert "unknown pipeline(s) nope" in stack.replay("runs", "-p", "nope").stderr.decode()
    assert "no deployment 'ingest/nope'" in stack.replay("runs", "-d", "ingest/nope").stderr.decode()
    assert "unknown reason(s) too-large" in stack.replay("dlq", "-p", pipeline.name, "-r", "too-large").stderr.decode()


def broker_dead_letter(pipeline, body: bytes) -> Outgoing:
    """A message without a message id that crashed consumers until the broker dead-lettered it."""
    return Outgoing(body, None, "application/json", {
        "x-first-death-reason": "delivery_limit", "x-first-death-queue": pipeline.queue,
        "x-first-death-exchange": "ingest", "x-last-death-reason": "delivery_limit",
        "x-death": [{"count": 1, "reason": "delivery_limit", "queue": pipeline.queue, "exchange": "ingest",
                     "routing-keys": [pipeline.name]}],
        "x-delivery-count": 5,
    })


def test_dlq_redrive_ingests_fixed_messages_once_and_keeps_invalid_ones(stack):
    pipeline = stack.pipeline("dlq")
    source = f"dlq-{uuid.uuid4().hex[:8]}"
    # A consumer with a small size limit dead-letters the ~3 KB records as too_large.
    small = stack.start("consumer-dlq", "consumer", "-p", pipeline.name, env={"INGEST_MAX_MESSAGE_BYTES": "2000"})
    big = [Outgoing(envelope(source, f"big-{i}", {"pad": "x" * 3000}), f"{source}-big-{i}") for i in range(4)]
    big.append(Outgoing(envelope(source, "big-noid", {"pad": "y" * 3000}), None))
    bad = [Outgoing(b'{"id": oops ' + str(i).encode(), f"{source}-bad-{i}") for i in range(3)]
    stack.publish(pipeline.name, big + bad)
    # The same poison message twice (published twice without an id), since fixed.
    poison = envelope(source, "poison")
    stack.publish(pipeline.name, [broker_dead_letter(pipeline, poison)] * 2, exchange="ingest.dlx")
    wait_for(lambda: stack.queue_depth(pipeline.dlq) == 10, 120, "10 dead letters", stack)
    assert small.stop() == 0
    stack.start("consumer-dlq", "consumer", "-p", pipeline.name)  # the limit is fixed

    before = snapshot(stack, pipeline)
    out = run_replay(stack, "dlq", "-p", pipeline.name, "--dry-run")
    assert "held 10 message(s); dry run, nothing changes" in out
    assert "too_large: 5 to re-publish, 0 kept" in out and "not_json: 3 to re-publish, 0 kept" in out
    assert "delivery_limit: 2 to re-publish, 0 kept" in out
    assert f"{source}-big-0: body is " in out and "bytes, the limit is 2000" in out
    assert f"{source}-bad-0: body is not JSON" in out
    assert "dry run: would re-publish 10, keep 0 in the DLQ; nothing changed" in out
    assert snapshot(stack, pipeline) == before

    out = run_replay(stack, "dlq", "-p", pipeline.name)
    replay_id = re.search(r"^replay (\w+):", out, re.M).group(1)
    assert "re-published 10, kept 0 in the DLQ, failed 0" in out
    # The fixed ones are stored once (the poison message once, though re-published twice)...
    wait_for(lambda: stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == 6,
             240, "the re-driven records stored", stack)
    runs = stack.wait_for_runs_final(pipeline)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    keys = [k for (k,) in stack.query("SELECT message_key FROM inbox WHERE pipeline = %s", (pipeline.name,))]
    assert len(keys) == 6
    assert f"id:sha256:{hashlib.sha256(poison).hexdigest()}" in keys
    assert {f"id:{m.message_id}" for m in big if m.message_id} <= set(keys)
    # ...and the invalid ones are back in the DLQ, each once, marked by the replay.
    wait_for(lambda: stack.queue_depth(pipeline.dlq) == 3 and stack.queue_depth(pipeline.queue) == 0,
             120, "the invalid messages dead-lettered again", stack)
    dead = stack.dead_letters(pipeline)
    assert sorted(m.message_id for m in dead) == sorted(m.message_id for m in bad)
    assert {m.headers["x-redriven-by"] for m in dead} == {replay_id}
    assert {m.headers["x-error-reason"] for m in dead} == {"not_json"}

    # Again, only too_large: there are none left; nothing is re-published or duplicated.
    stored = snapshot(stack, pipeline)
    out = run_replay(stack, "dlq", "-p", pipeline.name, "--reason", "too_large")
    assert "not_json: 0 re-published, 3 kept" in out and "re-published 0, kept 3 in the DLQ, failed 0" in out
    assert snapshot(stack, pipeline) == stored

    # Re-driving the still invalid ones with a limit: two go round once more, one stays.
    out = run_replay(stack, "dlq", "-p", pipeline.name, "--limit", "2")
    assert "re-published 2, kept 1 in the DLQ, failed 0" in out
    wait_for(lambda: stack.queue_depth(pipeline.queue) == 0 and stack.queue_depth(pipeline.dlq) == 3
             and len({m.headers["x-redriven-by"] for m in stack.dead_letters(pipeline)}) == 2,
             120, "two invalid messages dead-lettered again", stack)
    assert sorted(m.message_id for m in stack.dead_letters(pipeline)) == sorted(m.message_id for m in bad)
    assert sorted(k for (k,) in stack.query("SELECT message_key FROM inbox WHERE pipeline = %s",
                                            (pipeline.name,))) == sorted(keys)
