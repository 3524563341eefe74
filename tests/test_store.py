"""The sink upsert on a real PostgreSQL: the newest version wins whatever the order."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import datetime, timedelta, timezone

import orjson
import psycopg
import pytest

from ingest import db, inbox, sinks
from ingest.contract import decode, message_key
from ingest.inbox import Accepted, InboxRecord
from ingest.pipelines import Pipeline
from ingest.steps import load_program

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def conn(ingest_database):
    with db.connect(ingest_database, autocommit=True) as conn:
        sinks.ensure(conn, sink_for("p"))
        yield conn


def sink_for(pipeline: str) -> sinks.Sink:
    """The shipped records row, in table sink_store_test."""
    return load_program(Pipeline(name=pipeline, sink_table="sink_store_test")).sink


def store(conn, pipeline: str, records: list[InboxRecord]) -> None:
    """Write the records' rows as the records pipeline's final step makes them."""
    rows = [(r.message_key, False, sinks.row_values(sink_for(pipeline), {"type": r.type})) for r in records]
    sinks.write(conn, sink_for(pipeline), rows, {}, None)


def accept(source: str, record_id: str, minutes: int, version: str) -> Accepted:
    body = orjson.dumps({"id": record_id, "source": source, "type": "t", "data": {"v": version},
                         "occurred_at": (T0 + timedelta(minutes=minutes)).isoformat()})
    return Accepted(message_key(body, None), decode(body), body)


def write(url: str, pipeline: str, accepted: list[Accepted]) -> inbox.Written:
    async def run() -> inbox.Written:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as aconn:
            return await inbox.write_batch(aconn, pipeline, uuid.uuid4(), accepted, lease_seconds=60)

    return asyncio.run(run())


def loaded(conn, pipeline: str, accepted: list[Accepted]) -> list[InboxRecord]:
    keys = {a.message_key for a in accepted}
    rows = conn.execute("SELECT batch_id FROM inbox WHERE pipeline = %s", (pipeline,)).fetchall()
    records = [r for (batch,) in set(rows) for r in inbox.load_unfinished(conn, pipeline, batch, False)]
    return [r for r in records if r.message_key in keys]


def sink_version(conn, source: str, record_id: str) -> str:
    return conn.execute("SELECT data->>'v' FROM sink_store_test WHERE source = %s AND id = %s",
                        (source, record_id)).fetchone()[0]


def test_newest_occurred_at_wins_in_every_order(conn, ingest_database):
    pipeline, source = f"p{uuid.uuid4().hex[:6]}", "store"
    versions = [accept(source, "a", 5, "middle"), accept(source, "a", 9, "newest"), accept(source, "a", 1, "oldest")]
    write(ingest_database, pipeline, versions)
    records = {r.message_key: r for r in loaded(conn, pipeline, versions)}
    for order in itertools.permutations(versions):
        conn.execute("DELETE FROM sink_store_test")
        for version in order:  # one statement per version, in this order
            store(conn, pipeline, [records[version.message_key]])
        assert sink_version(conn, source, "a") == "newest", [v.record.data for v in order]


def test_duplicates_inside_one_call_and_ties_go_to_the_later_arrival(conn, ingest_database):
    pipeline, source = f"p{uuid.uuid4().hex[:6]}", "store"
    first, second = accept(source, "b", 3, "first"), accept(source, "b", 3, "second")  # same occurred_at
    write(ingest_database, pipeline, [first])
    write(ingest_database, pipeline, [second])
    records = loaded(conn, pipeline, [first, second])
    store(conn, pipeline, list(reversed(records)))
    assert sink_version(conn, source, "b") == "second"
    # Storing the earlier arrival again (a replay) changes nothing.
    store(conn, pipeline, [r for r in records if r.message_key == first.message_key])
    assert sink_version(conn, source, "b") == "second"
    statuses = conn.execute("SELECT DISTINCT status FROM inbox WHERE pipeline = %s", (pipeline,)).fetchall()
    assert statuses == [("done",)]


def test_redelivered_batch_is_not_kept(conn, ingest_database):
    pipeline, source = f"p{uuid.uuid4().hex[:6]}", "store"
    batch = [accept(source, str(i), i, "x") for i in range(5)]
    write(ingest_database, pipeline, batch)
    write(ingest_database, pipeline, batch)  # the same messages again, as after a crash before the ack
    assert conn.execute("SELECT count(*) FROM inbox WHERE pipeline = %s", (pipeline,)).fetchone()[0] == 5
    assert conn.execute("SELECT count(*), sum(record_count) FROM batches WHERE pipeline = %s",
                        (pipeline,)).fetchone() == (1, 5)


def test_a_key_stored_with_another_body_is_a_conflict_and_the_same_json_is_not(conn, ingest_database):
    pipeline, source = f"p{uuid.uuid4().hex[:6]}", "store"
    stored = accept(source, "c", 1, "stored")
    same = Accepted(stored.message_key, stored.record, orjson.dumps(orjson.loads(stored.body), option=orjson.OPT_INDENT_2))
    other = accept(source, "c", 2, "other")
    other = Accepted(stored.message_key, other.record, other.body)  # the same message id, another body
    fresh = accept(source, "d", 1, "fresh")
    assert write(ingest_database, pipeline, [stored]) == inbox.Written(1, {})

    written = write(ingest_database, pipeline, [same, fresh, other])

    assert written == inbox.Written(1, {2: stored.body_sha256.hex()})
    assert conn.execute("SELECT body->'data'->>'v' FROM inbox WHERE pipeline = %s AND message_key = %s",
                        (pipeline, stored.message_key)).fetchone() == ("stored",)
