"""A consumer holds at most INGEST_CONSUMER_MAX_HELD_BYTES of message bodies, whatever their
size. Its prefetch (2 x max_records) counted messages only: with messages near
max_message_bytes one consumer held up to 2 x max_records of them (gigabytes at the defaults)."""

from __future__ import annotations

import uuid

import orjson
import psycopg

from tests.fixtures.checks import assert_exactly_once, records
from tests.fixtures.stack import Outgoing, wait_for

BODY = 65_000  # near the stack's INGEST_MAX_MESSAGE_BYTES (65,536)
BOUND = 17 * 65_536  # two windows of 8 messages of the largest size, and one being settled
ENV = {"INGEST_CONSUMER_MAX_HELD_BYTES": str(BOUND)}
INSERTS_WAITING = """SELECT count(*) FROM pg_stat_activity
                     WHERE datname = %s AND wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO inbox%%'"""


def large_records(source: str, count: int) -> list[Outgoing]:
    def body(i: int) -> bytes:
        envelope = {"id": str(i), "source": source, "type": "reading", "occurred_at": "2024-05-01T00:00:00Z",
                    "data": {"pad": ""}}
        envelope["data"]["pad"] = "x" * (BODY - len(orjson.dumps(envelope)))
        return orjson.dumps(envelope)

    return [Outgoing(body(i), f"{source}-{i}") for i in range(count)]


def test_a_consumer_holds_no_more_message_bytes_than_its_bound(stack):
    pipeline = stack.pipeline("held")
    source = f"held-{uuid.uuid4().hex[:8]}"
    count = 208
    messages = large_records(source, count)
    assert {len(m.body) for m in messages} == {BODY}
    stack.publish(pipeline.name, messages)
    database = psycopg.connect(stack.database_url).info.dbname
    # A transaction holding the inbox keeps the first batch's commit waiting: the consumer then
    # holds what it took, and the broker the rest.
    with psycopg.connect(stack.database_url) as lock:
        lock.execute("LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE")
        consumer = stack.start_consumer("consumer-held", pipeline, env=ENV)
        wait_for(lambda: stack.scalar(INSERTS_WAITING, (database,)) == 1, 60, "the first commit waiting", stack)
        unacked = count - stack.queue_depth(pipeline.queue)
        assert unacked * BODY <= BOUND, (f"the consumer holds {unacked} messages of {BODY} bytes "
                                         f"({unacked * BODY} bytes), more than its bound of {BOUND}")
        # It took both windows, and its gauge says so.
        assert unacked == 16
        assert consumer.metric("ingest_consumer_held_bytes") == unacked * BODY
        lock.rollback()  # the lock goes: the rest flows through
    held = []

    def stored() -> bool:  # sampling the gauge all along
        held.append(consumer.metric("ingest_consumer_held_bytes"))
        return stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == count

    wait_for(stored, 240, f"{count} records stored", stack, interval=0.02)
    assert max(held) <= BOUND, max(held)
    assert_exactly_once(stack, pipeline, source, count)
    assert max(n for (n,) in stack.query("SELECT record_count FROM batches WHERE pipeline = %s",
                                         (pipeline.name,))) <= 16
    assert stack.dead_letters(pipeline) == []
    assert consumer.metric("ingest_messages_received_total") == count  # each delivered once
    assert consumer.metric("ingest_messages_acked_total") == count
    assert consumer.metric("ingest_consumer_held_bytes") == 0
    log = consumer.process.log_path.read_text(errors="replace")
    assert f"{pipeline.name}: holding back: " in log, log[-3000:]
    assert consumer.process.stop(timeout=30) == 0


def test_small_messages_still_make_whole_batches_through_windows_smaller_than_a_batch(stack):
    """Under the same bound a window is 8 messages: batches of 50 need windows one after another."""
    pipeline = stack.pipeline("heldsmall")
    source = f"heldsmall-{uuid.uuid4().hex[:8]}"
    count = 300
    stack.publish(pipeline.name, records(source, count))
    consumer = stack.start_consumer("consumer-heldsmall", pipeline, env=ENV)
    assert_exactly_once(stack, pipeline, source, count)
    sizes = [n for (n,) in stack.query("SELECT record_count FROM batches WHERE pipeline = %s", (pipeline.name,))]
    assert max(sizes) == pipeline.batch.max_records, sizes
    assert consumer.metric("ingest_messages_received_total") == count
    assert consumer.metric("ingest_consumer_held_bytes") == 0
    assert stack.dead_letters(pipeline) == []
    assert consumer.process.stop(timeout=30) == 0
