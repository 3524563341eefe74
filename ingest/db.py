"""Database access: connections, creating databases, migrations, the flow runs' connection pool.

Rules for migrations (ingest/migrations/NNNN_*.sql, applied in name order):
- Never edit a migration once shipped: `schema_migrations` keeps the SHA-256 of the text
  each was applied with, and `migrate` refuses to run, naming the file, when it differs.
  Change the schema with a new migration instead.
- A migration runs in one transaction with its row in `schema_migrations`, unless its
  first line is `-- no transaction`: then each of its statements (one a line-ending `;`)
  runs on its own, outside any transaction, still under the migration lock. Every index
  on an existing table must be built that way, `CREATE INDEX CONCURRENTLY`, so that
  consumers keep writing meanwhile (a plain CREATE INDEX blocks every insert until it is
  built). A concurrent build that fails leaves an invalid index behind: start such a
  migration with `DROP INDEX CONCURRENTLY IF EXISTS` of the index it builds, so that
  running it again after a failure builds it anew.
"""

from __future__ import annotations

import hashlib
import logging
import re
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

NO_TRANSACTION = "-- no transaction"


class MigrationError(Exception):
    """A migration failed, or an applied one's text changed since (the schema may not be what it says)."""


def _migrations(directory: Path = MIGRATIONS) -> list[tuple[str, str]]:
    return [(f.name, f.read_text(encoding="utf-8")) for f in sorted(directory.glob("*.sql"))]


def migration_names(directory: Path = MIGRATIONS) -> list[str]:
    return [name for name, _ in _migrations(directory)]


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def has_table(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def pending_migrations(conn: psycopg.Connection, directory: Path = MIGRATIONS) -> list[str]:
    """The migrations migrate() would apply, without applying them."""
    done = set()
    if has_table(conn, "schema_migrations"):
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    return [name for name in migration_names(directory) if name not in done]


def _statements(text: str) -> list[str]:
    # Each statement of a no-transaction migration is sent alone: several in one query
    # string would run as one implicit transaction, which CONCURRENTLY refuses.
    return [part.strip() for part in re.split(r";[ \t]*$", text, flags=re.MULTILINE) if _has_sql(part)]


def _has_sql(part: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in part.splitlines())


def _check_applied(conn: psycopg.Connection, migrations: list[tuple[str, str]]) -> dict[str, str | None]:
    """The applied migrations' checksums; raise MigrationError if one's text changed since."""
    applied = dict(conn.execute("SELECT name, checksum FROM schema_migrations").fetchall())
    for name, text in migrations:
        if name not in applied:
            continue
        if applied[name] is None:
            # Applied before checksums were recorded: take today's text as what was applied.
            conn.execute("UPDATE schema_migrations SET checksum = %s WHERE name = %s", (checksum(text), name))
        elif applied[name] != checksum(text):
            raise MigrationError(
                f"migration {name} was changed after it was applied (sha256 {applied[name]} when applied, "
                f"{checksum(text)} now): restore its text and put the change in a new migration"
            )
    return applied


def migrate(conn: psycopg.Connection, directory: Path = MIGRATIONS) -> list[str]:
    """Apply the migrations not applied yet, in order; return their names.

    `conn` must be in autocommit mode: each migration opens its own transaction, or none
    (`-- no transaction`). A session advisory lock serialises concurrent bootstraps
    (several containers starting at once) across all of them.
    """
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection")
    migrations = _migrations(directory)
    applied_now = []
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        with conn.transaction():
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            # Databases migrated before checksums existed get the column, filled in below.
            conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
            applied = _check_applied(conn, migrations)
        for name, text in migrations:
            if name in applied:
                continue
            _apply(conn, name, text)
            applied_now.append(name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now


def _apply(conn: psycopg.Connection, name: str, text: str) -> None:
    record = "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)"
    try:
        if text.lstrip().startswith(NO_TRANSACTION):
            for statement in _statements(text):
                conn.execute(statement)
            conn.execute(record, (name, checksum(text)))
        else:
            with conn.transaction():
                conn.execute(text)
                conn.execute(record, (name, checksum(text)))
    except psycopg.Error as exc:
        raise MigrationError(f"migration {name} failed: {exc}".strip()) from exc
    log.info("applied migration %s", name)


_pools: dict[str, "ConnectionPool"] = {}


# Connections of a flow-run process; its task runs use at most this many threads (flows/ingest.py).
POOL_SIZE = 8


def pool(url: str) -> "ConnectionPool":
    """A process-wide pool per database, for the threads of a flow run's tasks."""
    from psycopg_pool import ConnectionPool

    if url not in _pools:
        _pools[url] = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=True,
                                     configure=_orjson_loads)
    return _pools[url]


def _orjson_loads(conn: psycopg.Connection) -> None:
    """jsonb read with orjson, not the standard library: a batch reads every record's body
    (json.loads was the largest single cost in a profiled `chunk` run). What it reads was written from
    JSON the consumers decoded with orjson, so it reads it the same."""
    import orjson
    from psycopg.types.json import set_json_loads

    set_json_loads(orjson.loads, conn)
