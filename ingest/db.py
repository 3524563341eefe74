"""Database access: connections, creating databases, migrations, the flow runs' connection pool."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger(__name__)

# Serialises concurrent bootstraps (several containers starting at once).
MIGRATION_LOCK = 0x1A9E57


class DatabaseUnavailable(Exception):
    pass


def connect(url: str, **kwargs) -> psycopg.Connection:
    try:
        return psycopg.connect(url, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {exc}".strip()) from None


def redact(url: str) -> str:
    params = conninfo_to_dict(url)
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)


def database_exists(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=10).close()
        return True
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {exc}".strip()) from None
        return False


def ensure_database(url: str) -> bool:
    """Create the database `url` names if it does not exist; True if it was created."""
    params = conninfo_to_dict(url)
    name = params.get("dbname")
    if not name:
        raise ValueError(f"{redact(url)} names no database")
    if database_exists(url):
        return False
    with connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False  # created concurrently by another bootstrap
        except psycopg.errors.InsufficientPrivilege:
            raise DatabaseUnavailable(
                f"database {name!r} does not exist and this role may not create it: "
                f"create it once as an administrator (CREATE DATABASE {name})"
            ) from None
    return True


MIGRATIONS = Path(__file__).parent / "migrations"


def _migrations() -> list[tuple[str, str]]:
    return [(f.name, f.read_text(encoding="utf-8")) for f in sorted(MIGRATIONS.glob("*.sql"))]


def migration_names() -> list[str]:
    return [name for name, _ in _migrations()]


def has_table(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def pending_migrations(conn: psycopg.Connection) -> list[str]:
    """The migrations migrate() would apply, without applying them."""
    done = set()
    if has_table(conn, "schema_migrations"):
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    return [name for name in migration_names() if name not in done]


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations not applied yet, in one transaction; return their names."""
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        for name, text in _migrations():
            if name in done:
                continue
            conn.execute(text)
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
            applied_now.append(name)
    return applied_now


_pools: dict[str, "ConnectionPool"] = {}


# Connections of a flow-run process; its task runs use at most this many threads (flows/ingest.py).
POOL_SIZE = 8


def pool(url: str) -> "ConnectionPool":
    """A process-wide pool per database, for the threads of a flow run's tasks."""
    from psycopg_pool import ConnectionPool

    if url not in _pools:
        _pools[url] = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=True)
    return _pools[url]
