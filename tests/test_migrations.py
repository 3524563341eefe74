"""Migrations on the real PostgreSQL: checksums of applied migrations, migrations that run
outside a transaction, and a backfill's requeue not taken for a stuck record."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ingest import db
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
