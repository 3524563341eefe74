"""A message id used again for another body: the inbox keeps the first record, and the
newcomer is dead-lettered as `id_conflict` with both bodies' hashes. It used to be acked
and dropped, logged at INFO among the ordinary redeliveries. The same body again (or the
same JSON with other spacing) is still a duplicate, dropped."""

from __future__ import annotations

import hashlib
import uuid

import orjson

from tests.fixtures.stack import Outgoing, wait_for


def body(source: str, record_id: str, total: float) -> bytes:
    return orjson.dumps({"id": record_id, "source": source, "type": "order.created",
                         "occurred_at": "2024-05-01T12:00:00Z", "data": {"total": total}})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_message_id_reused_for_another_body_is_dead_lettered_as_id_conflict(stack):
    pipeline = stack.pipeline("conflict")
    consumer = stack.start_consumer("consumer-conflict", pipeline)
    source = f"conflict-{uuid.uuid4().hex[:8]}"
    first = Outgoing(body(source, "1", 10), f"{source}-reused")
    sink = f"SELECT id, data FROM {pipeline.sink_table} WHERE source = %s ORDER BY id"
    stack.publish(pipeline.name, [first])
    wait_for(lambda: stack.query(sink, (source,)), 60, "the first record stored", stack)

    again = Outgoing(first.body, first.message_id)  # a producer's retry
    respaced = Outgoing(orjson.dumps(orjson.loads(first.body), option=orjson.OPT_INDENT_2), first.message_id)
    reused = Outgoing(body(source, "2", 99), first.message_id)  # another record under the same id
    # Two new messages sharing an id in one publish, most likely one batch: the first one wins.
    twin, other_twin = Outgoing(body(source, "3", 3), f"{source}-twin"), Outgoing(body(source, "4", 4), f"{source}-twin")
    stack.publish(pipeline.name, [again, respaced, reused, twin, other_twin])

    letters = wait_for(lambda: len(found := stack.dead_letters(pipeline)) >= 2 and found, 60, "the conflicts", stack)
    wait_for(lambda: consumer.metric("ingest_messages_acked_total") == 4, 60, "the others acked", stack)
    assert sorted((m.message_id, m.body) for m in letters) == sorted(
        [(reused.message_id, reused.body), (other_twin.message_id, other_twin.body)])
    assert {m.headers["x-error-reason"] for m in letters} == {"id_conflict"}
    error = next(m.headers["x-error"] for m in letters if m.message_id == reused.message_id)
    assert f"sha256:{sha256(first.body)}" in error and f"sha256:{sha256(reused.body)}" in error, error
    stack.wait_for_runs_final(pipeline)
    assert stack.query(sink, (source,)) == [("1", {"total": 10}), ("3", {"total": 3})]
    assert stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s", (pipeline.name,)) == 2

    assert consumer.metric("ingest_messages_dead_lettered_total", reason="id_conflict") == 2
    status = orjson.loads(stack.ingest("status", "--json", "-p", pipeline.name).stdout)["pipelines"][pipeline.name]
    assert status["dlq"]["reasons"] == {"id_conflict": 2}
    assert consumer.process.stop(timeout=30) == 0
