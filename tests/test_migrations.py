"""Migrations on the real PostgreSQL: checksums of applied migrations, migrations that run
outside a transaction, and a backfill's requeue not taken for a stuck record."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import psycopg
import pytest

from ingest import db
from ingest.inbox import STUCK, backlog
from ingest.windows import Window, assign_batches
from tests.fixtures.services import create_database, drop_database


@pytest.fixture
def fresh_database():
    url = create_database("ingest_migrations")
    yield url
    drop_database(url)


def write(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text, encoding="utf-8")


def test_checksum_recorded_and_changed_migration_refused(fresh_database, tmp_path):
    write(tmp_path, "0001_a.sql", "CREATE TABLE a (x int);\n")
    with db.connect(fresh_database, autocommit=True) as conn:
        assert db.migrate(conn, tmp_path) == ["0001_a.sql"]
        recorded = conn.execute("SELECT checksum FROM schema_migrations WHERE name = '0001_a.sql'").fetchone()[0]
        assert recorded == hashlib.sha256(b"CREATE TABLE a (x int);\n").hexdigest()

        write(tmp_path, "0001_a.sql", "CREATE TABLE a (x bigint);\n")
        write(tmp_path, "0002_b.sql", "CREATE TABLE b (x int);\n")
        with pytest.raises(db.MigrationError, match=r"migration 0001_a\.sql was changed after it was applied"):
            db.migrate(conn, tmp_path)
        assert not db.has_table(conn, "b"), "nothing is applied after a changed migration"


def test_database_migrated_before_checksums_gets_them(fresh_database, tmp_path):
    write(tmp_path, "0001_a.sql", "CREATE TABLE a (x int);\n")
    with db.connect(fresh_database, autocommit=True) as conn:
        # schema_migrations as every database migrated before had it: no checksum column.
        conn.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("CREATE TABLE a (x int)")
        conn.execute("INSERT INTO schema_migrations (name) VALUES ('0001_a.sql')")
        assert db.migrate(conn, tmp_path) == []
        assert conn.execute("SELECT checksum FROM schema_migrations").fetchone()[0] == db.checksum(
            "CREATE TABLE a (x int);\n")
        write(tmp_path, "0001_a.sql", "CREATE TABLE a (y int);\n")
        with pytest.raises(db.MigrationError, match="0001_a.sql"):
            db.migrate(conn, tmp_path)


def test_no_transaction_migration_builds_index_concurrently(fresh_database, tmp_path):
    write(tmp_path, "0001_t.sql", "CREATE TABLE t (x int);\n")
    write(tmp_path, "0002_t_x.sql", "-- no transaction\n-- built while writes go on\n"
                                    "DROP INDEX CONCURRENTLY IF EXISTS t_x;\n"
                                    "CREATE INDEX CONCURRENTLY t_x ON t (x);\n")
    with db.connect(fresh_database, autocommit=True) as conn:
        assert db.migrate(conn, tmp_path) == ["0001_t.sql", "0002_t_x.sql"]
        assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass").fetchone()[0]
        assert db.migrate(conn, tmp_path) == []


def test_failing_migration_named(fresh_database, tmp_path):
    write(tmp_path, "0001_bad.sql", "CREATE TABLE t (x nosuchtype);\n")
    with db.connect(fresh_database, autocommit=True) as conn:
        with pytest.raises(db.MigrationError, match=r"migration 0001_bad\.sql failed: .*nosuchtype"):
            db.migrate(conn, tmp_path)
        assert db.pending_migrations(conn, tmp_path) == ["0001_bad.sql"]


def test_shipped_migrations_index_pending_records_concurrently(ingest_database):
    with psycopg.connect(ingest_database) as conn:
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('inbox_pending_since')").fetchone()
        assert valid == (True,)
        assert conn.execute("SELECT to_regclass('inbox_pending')").fetchone()[0] is None


def test_backfill_requeue_is_not_stuck(ingest_database):
    """A record backfilled days after it arrived is pending again, but not for days."""
    pipeline = f"requeue_{uuid.uuid4().hex[:8]}"
    batch = uuid.uuid4()
    with psycopg.connect(ingest_database, autocommit=True) as conn:
        conn.execute("INSERT INTO batches (batch_id, pipeline, record_count, status) VALUES (%s, %s, 3, 'submitted')",
                     (batch, pipeline))
        for i in range(3):
            conn.execute(
                """INSERT INTO inbox (pipeline, message_key, batch_id, source, record_id, type, occurred_at, body,
                                      status, received_at)
                   VALUES (%s, %s, %s, 's', %s, 't', now() - interval '3 days', '{}', 'done', now() - interval '3 days')""",
                (pipeline, f"k{i}", batch, str(i)))
        window = Window(*(conn.execute("SELECT now() - interval '4 days', now()").fetchone()), by="received")
        assert len(assign_batches(conn, pipeline, f"backfill:{uuid.uuid4()}", window, "all", 600, 10)) == 1

        stuck = conn.execute(f"SELECT count(*) FROM inbox WHERE pipeline = %(pipeline)s AND {STUCK}",
                             {"pipeline": pipeline, "stuck": 600}).fetchone()[0]
        assert stuck == 0

    async def oldest_pending() -> float:
        async with await psycopg.AsyncConnection.connect(ingest_database) as aconn:
            return (await backlog(aconn, [pipeline]))[pipeline][1]

    assert 0 < asyncio.run(oldest_pending()) < 600
