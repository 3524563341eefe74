"""Typed sinks on a real PostgreSQL: the table made from the row model, additive evolution,
refusals that name the column, `--dry-run`, and soft deletes that stale updates cannot undo."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import orjson
import psycopg
import pytest
from pydantic import BaseModel

from ingest import db, inbox, sinks
from ingest.contract import decode, message_key
from ingest.inbox import Accepted
from tests.fixtures.services import create_database, drop_database
from tests.fixtures.stack import INGEST

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


class V1(BaseModel):
    order_id: str
    amount: Decimal
    paid: bool
    placed_at: datetime
    day: date
    ref: UUID
    count: int
    ratio: float
    items: list[dict]


class V2(V1):
    note: str | None = None  # a new optional field


class TypeChanged(BaseModel):
    order_id: str
    amount: float  # was Decimal


class NewRequired(V1):
    region: str


@pytest.fixture
def conn(ingest_database):
    with db.connect(ingest_database, autocommit=True) as conn:
        yield conn


def table_name() -> str:
    return f"sink_{uuid.uuid4().hex[:8]}"


def columns(conn, table: str) -> dict[str, str]:
    return dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s",
                             (table,)).fetchall())


def test_the_table_has_the_models_types_and_the_lineage_columns(conn):
    table = table_name()
    sinks.ensure(conn, sinks.sink_of("p", table, V1, ("order_id",)))
    assert columns(conn, table) == {
        "source": "text", "id": "text", "occurred_at": "timestamp with time zone", "inbox_seq": "bigint",
        "flow_run_id": "uuid", "ingested_at": "timestamp with time zone", "deleted_at": "timestamp with time zone",
        "order_id": "text", "amount": "numeric", "paid": "boolean", "placed_at": "timestamp with time zone",
        "day": "date", "ref": "uuid", "count": "bigint", "ratio": "double precision", "items": "jsonb",
    }
    # Bootstrapping again changes nothing.
    assert sinks.plan(conn, sinks.sink_of("p", table, V1, ("order_id",))) == []


def test_a_new_optional_field_adds_a_nullable_column_and_old_rows_keep_null(conn):
    table = table_name()
    sinks.ensure(conn, sinks.sink_of("p", table, V1, ("order_id",)))
    conn.execute(f"INSERT INTO {table} (source, id, occurred_at, inbox_seq, order_id) VALUES ('s', '1', now(), 1, 'A')")
    statements = sinks.ensure(conn, sinks.sink_of("p", table, V2, ("order_id",)))
    assert statements == [f'ALTER TABLE "{table}" ADD COLUMN "note" text']
    assert conn.execute(f"SELECT note FROM {table} WHERE order_id = 'A'").fetchone() == (None,)


@pytest.mark.parametrize(("model", "key", "message"), [
    (TypeChanged, ("order_id",), "column 'amount' is numeric in the table but the model makes it double precision"),
    (NewRequired, ("order_id",), "new field 'region' is required and has no default"),
    (V1, ("order_id", "day"), "the key changed: the table's is (order_id), the config's (order_id, day)"),
])
def test_changes_that_cannot_be_made_in_place_are_refused_with_both_definitions(conn, model, key, message):
    table = table_name()
    sinks.ensure(conn, sinks.sink_of("p", table, V1, ("order_id",)))
    with pytest.raises(sinks.SinkSchemaError) as error:
        sinks.plan(conn, sinks.sink_of("p", table, model, key))
    assert message in str(error.value) and table in str(error.value)


def test_a_model_field_may_not_take_a_lineage_name_and_the_key_must_be_fields():
    class Clash(BaseModel):
        occurred_at: datetime

    with pytest.raises(sinks.SinkSchemaError, match="'occurred_at' is a lineage column"):
        sinks.sink_of("p", "t", Clash, sinks.DEFAULT_KEY)
    with pytest.raises(sinks.SinkSchemaError, match=r"key column\(s\) nope are not fields of V1"):
        sinks.sink_of("p", "t", V1, ("nope",))


def _accept(source: str, record_id: str, minutes: int) -> Accepted:
    body = orjson.dumps({"id": record_id, "source": source, "type": "t", "data": {},
                         "occurred_at": (T0 + timedelta(minutes=minutes)).isoformat()})
    return Accepted(message_key(body, None), decode(body), body)


def _inbox(url: str, pipeline: str, accepted: list[Accepted]) -> None:
    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as aconn:
            await inbox.write_batch(aconn, pipeline, uuid.uuid4(), accepted, lease_seconds=60)

    asyncio.run(run())


class Simple(BaseModel):
    order_id: str
    status: str


def test_a_deletion_is_soft_and_a_stale_update_after_it_cannot_bring_the_row_back(conn, ingest_database):
    pipeline, table = f"p{uuid.uuid4().hex[:6]}", table_name()
    sink = sinks.sink_of(pipeline, table, Simple, ("order_id",))
    sinks.ensure(conn, sink)
    created, deleted, stale = _accept("s", "1", 1), _accept("s", "2", 9), _accept("s", "3", 5)
    _inbox(ingest_database, pipeline, [created, deleted, stale])
    sinks.write(conn, sink, [(created.message_key, False, {"order_id": "A", "status": "created"})], {}, None)
    sinks.write(conn, sink, [(deleted.message_key, True, sinks.deletion_values(sink, {"order_id": "A"}))], {}, None)
    sinks.write(conn, sink, [(stale.message_key, False, {"order_id": "A", "status": "paid"})], {}, None)
    status, deleted_at, occurred_at = conn.execute(
        f"SELECT status, deleted_at, occurred_at FROM {table} WHERE order_id = 'A'").fetchone()
    assert deleted_at is not None and status == "created"  # deleted, its last values kept
    assert occurred_at == T0 + timedelta(minutes=9)
    # A deletion that arrives before the record (reordered) leaves a tombstone all the same.
    early_delete, late_create = _accept("s", "4", 20), _accept("s", "5", 15)
    _inbox(ingest_database, pipeline, [early_delete, late_create])
    sinks.write(conn, sink, [(early_delete.message_key, True, sinks.deletion_values(sink, {"order_id": "B"}))], {}, None)
    sinks.write(conn, sink, [(late_create.message_key, False, {"order_id": "B", "status": "created"})], {}, None)
    assert conn.execute(f"SELECT status, deleted_at IS NOT NULL FROM {table} WHERE order_id = 'B'").fetchone() == (
        None, True)
    statuses = conn.execute("SELECT DISTINCT status FROM inbox WHERE pipeline = %s", (pipeline,)).fetchall()
    assert statuses == [("done",)]


def test_bootstrap_dry_run_prints_the_ddl_and_changes_nothing(tmp_path):
    database = create_database("ingest_dry_run")
    try:
        config = tmp_path / "pipelines.toml"
        config.write_text('[pipelines.orders]\nsteps = ["tasks.orders:order", "tasks.orders:amount_eur", '
                          '"tasks.orders:customer", "tasks.orders:row"]\n'
                          '[pipelines.orders.sink]\ntable = "orders_dry"\nrow = "tasks.orders:OrderRow"\n'
                          'key = ["order_id"]\n')
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "PREFECT_"))},
               "INGEST_DATABASE_URL": database, "INGEST_PIPELINES_FILE": str(config)}
        result = subprocess.run([INGEST, "bootstrap", "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "-- migrations to apply: 0001_inbox_batches.sql" in result.stdout
        assert 'CREATE TABLE "orders_dry" (' in result.stdout and '"amount" numeric' in result.stdout
        assert "dry run: nothing was changed" in result.stdout
        with psycopg.connect(database) as check:
            assert check.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
    finally:
        drop_database(database)


def test_a_row_that_does_not_fit_the_model_names_the_field():
    sink = sinks.sink_of("p", "t", Simple, ("order_id",))
    assert sinks.row_values(sink, {"order_id": "A", "status": "paid"}) == {"order_id": "A", "status": "paid"}
    with pytest.raises(ValueError, match=r"row does not fit Simple: status: Field required"):
        sinks.row_values(sink, {"order_id": "A"})
    with pytest.raises(ValueError, match=r"Delete\(\) must name exactly the key order_id; got nothing"):
        sinks.deletion_values(sink, {})
