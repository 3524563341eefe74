"""Typed sinks: a table per pipeline made from a row model (pydantic), written exactly once.

Columns come from the model's fields (str text, int bigint, float double precision,
Decimal numeric, bool boolean, datetime timestamptz, date, UUID uuid, dict/list jsonb,
`FromInbox` the record's `data` exactly as sent), plus lineage columns every sink has:
source, id, occurred_at, inbox_seq, flow_run_id, ingested_at, deleted_at.

Evolution is additive and explicit (`plan()`): a new optional field adds a nullable
column; a new required field, a changed type or a changed key is refused with an error
naming the column and both definitions; a removed field leaves its column. Model columns
are nullable in the table whatever the model says, because a deleted key's row keeps only
its key: every row written is checked against the model first.

`write()` upserts in one statement that also marks the records done (or skipped) in the
inbox, so storing and settling are one transaction. Per key the newest occurred_at wins
(ties: the later arrival), whatever order batches and retries run in; a deletion is a
newer version too, so a stale update arriving later cannot bring the row back.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

import orjson
import psycopg
from psycopg import sql
from pydantic import BaseModel, ValidationError

from ingest.times import as_utc


class _FromInbox:
    """Marks a field filled from the inbox: the record's `data`, exactly as sent (numbers keep their text)."""


FromInbox = Annotated[Any, _FromInbox()]

# Lineage: every row traces back to its message (inbox_seq) and its run (flow_run_id).
LINEAGE = {
    "source": "text NOT NULL", "id": "text NOT NULL", "occurred_at": "timestamptz NOT NULL",
    "inbox_seq": "bigint NOT NULL", "flow_run_id": "uuid", "ingested_at": "timestamptz NOT NULL DEFAULT now()",
    "deleted_at": "timestamptz",
}
DEFAULT_KEY = ("source", "id")
# Names the write statement uses for its own columns.
RESERVED = (*LINEAGE, "message_key", "deleted")
TYPES = {str: "text", int: "bigint", float: "double precision", Decimal: "numeric", bool: "boolean",
         datetime: "timestamptz", date: "date", UUID: "uuid", dict: "jsonb", list: "jsonb"}
# information_schema.columns.data_type of each
CATALOG_NAMES = {"text": "text", "bigint": "bigint", "double precision": "double precision", "numeric": "numeric",
                 "boolean": "boolean", "timestamptz": "timestamp with time zone", "date": "date", "uuid": "uuid",
                 "jsonb": "jsonb"}


class SinkSchemaError(Exception):
    pass


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    from_inbox: bool = False
    required: bool = False  # by the model (the table allows NULL: see the module docstring)


@dataclass(frozen=True)
class Sink:
    pipeline: str
    table: str
    model: type[BaseModel]
    key: tuple[str, ...]
    columns: tuple[Column, ...]

    @property
    def default_key(self) -> bool:
        return self.key == DEFAULT_KEY


def _sql_type(name: str, annotation: Any, model: type) -> str:
    """The SQL type of a field's annotation, Optional and Annotated unwrapped."""
    if typing.get_origin(annotation) is Annotated:
        return _sql_type(name, typing.get_args(annotation)[0], model)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _sql_type(name, members[0], model)
    base = typing.get_origin(annotation) or annotation
    if base in TYPES:
        return TYPES[base]
    raise SinkSchemaError(f"{model.__module__}.{model.__name__}.{name}: type {annotation!r} has no column type "
                          f"(use one of {', '.join(t.__name__ for t in TYPES)}, Optional of them, or FromInbox)")


def sink_of(pipeline: str, table: str, model: type[BaseModel], key: tuple[str, ...]) -> Sink:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise SinkSchemaError(f"pipeline {pipeline!r}: the sink's row {model!r} is not a pydantic model")
    columns = []
    for name, info in model.model_fields.items():
        if name in RESERVED:
            raise SinkSchemaError(f"{model.__module__}.{model.__name__}.{name}: {name!r} is a lineage column every "
                                  f"sink has, or reserved ({', '.join(RESERVED)}); name the field otherwise")
        if any(isinstance(m, _FromInbox) for m in info.metadata):
            columns.append(Column(name, "jsonb", from_inbox=True))
        else:
            columns.append(Column(name, _sql_type(name, info.annotation, model), required=info.is_required()))
    names = {c.name for c in columns}
    if key != DEFAULT_KEY and (missing := [k for k in key if k not in names]):
        raise SinkSchemaError(f"pipeline {pipeline!r}: key column(s) {', '.join(missing)} are not fields of "
                              f"{model.__name__} (fields: {', '.join(names)})")
    return Sink(pipeline, table, model, key, tuple(columns))


# --- the table: create and evolve -------------------------------------------------------------


def create_statement(sink: Sink) -> str:
    parts = [f"{sql.Identifier(n).as_string()} {d}" for n, d in LINEAGE.items()]
    parts += [f"{sql.Identifier(c.name).as_string()} {c.sql_type}" + (" NOT NULL" if c.name in sink.key else "")
              for c in sink.columns]
    parts.append(f"PRIMARY KEY ({', '.join(sql.Identifier(k).as_string() for k in sink.key)})")
    return f"CREATE TABLE {sql.Identifier(sink.table).as_string()} (\n    " + ",\n    ".join(parts) + "\n)"


def plan(conn: psycopg.Connection, sink: Sink) -> list[str]:
    """The DDL that makes the table fit the model (nothing if it does); SinkSchemaError if it cannot."""
    existing = dict(conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = %s", (sink.table,)).fetchall())
    if not existing:
        return [create_statement(sink)]
    key = tuple(name for (name,) in conn.execute(
        """SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
           WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)""",
        (sql.Identifier(sink.table).as_string(),)).fetchall())
    where = f"pipeline {sink.pipeline!r}, table {sink.table!r}, model {sink.model.__module__}.{sink.model.__name__}"
    if key != sink.key:
        raise SinkSchemaError(f"{where}: the key changed: the table's is ({', '.join(key)}), the config's "
                              f"({', '.join(sink.key)}); a key cannot change in place: create a new table")
    statements = []
    lineage = [(name, definition.split()[0], False) for name, definition in LINEAGE.items()]
    for name, sql_type, required in lineage + [(c.name, c.sql_type, c.required) for c in sink.columns]:
        if name not in existing:
            if required:
                raise SinkSchemaError(f"{where}: new field {name!r} is required and has no default: the table's "
                                      f"existing rows have no value for it; make it Optional or give it a default")
            statements.append(f"ALTER TABLE {sql.Identifier(sink.table).as_string()} "
                              f"ADD COLUMN {sql.Identifier(name).as_string()} {sql_type}")
        elif existing[name] != CATALOG_NAMES[sql_type]:
            raise SinkSchemaError(f"{where}: column {name!r} is {existing[name]} in the table but the model makes it "
                                  f"{CATALOG_NAMES[sql_type]}; types cannot change in place: add a new field instead")
    return statements


def ensure(conn: psycopg.Connection, sink: Sink) -> list[str]:
    """Apply plan(); return the statements run."""
    statements = plan(conn, sink)
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)
    return statements


# --- rows ------------------------------------------------------------------------------------


def row_values(sink: Sink, value: Any) -> dict[str, Any]:
    """A final step's value as the model's columns; ValueError naming the field if it does not fit."""
    try:
        row = value if isinstance(value, sink.model) else sink.model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(row)'}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise ValueError(f"row does not fit {sink.model.__name__}: {problems}") from None
    values = row.model_dump(mode="python")
    return {c.name: values.get(c.name) for c in sink.columns if not c.from_inbox}


def deletion_values(sink: Sink, key: dict[str, Any]) -> dict[str, Any]:
    if sink.default_key:
        if key:
            raise ValueError(f"Delete() takes no key values for a sink keyed on (source, id), got {sorted(key)}")
        return {c.name: None for c in sink.columns if not c.from_inbox}
    missing = [k for k in sink.key if k not in key]
    if missing or set(key) - set(sink.key):
        raise ValueError(f"Delete() must name exactly the key {', '.join(sink.key)}; got {', '.join(key) or 'nothing'}")
    return {c.name: key.get(c.name) for c in sink.columns if not c.from_inbox}


def _adapt(column: Column, value: Any) -> Any:
    if value is None:
        return None
    if column.sql_type == "jsonb":
        return orjson.dumps(value, default=str).decode()
    if column.sql_type == "timestamptz":
        return as_utc(value)
    return value


_WRITE = """
WITH input AS (
    SELECT * FROM unnest({arrays}) AS t(message_key, deleted{written})
), latest AS (
    SELECT DISTINCT ON ({key}) i.source AS source, i.record_id AS id, i.occurred_at, i.seq, t.deleted{values}
    FROM input t JOIN inbox i ON i.pipeline = %(pipeline)s AND i.message_key = t.message_key
    ORDER BY {key}, i.occurred_at DESC, i.seq DESC
), done AS (
    UPDATE inbox SET status = 'done', error = NULL, attempts = attempts + 1, processed_at = now(),
           flow_run_id = %(flow_run_id)s
    WHERE pipeline = %(pipeline)s AND message_key = ANY(%(keys)b::text[])
), skipped AS (
    UPDATE inbox SET status = 'skipped', error = s.reason, attempts = attempts + 1, processed_at = now(),
           flow_run_id = %(flow_run_id)s
    FROM unnest(%(skipped_keys)b::text[], %(skipped_reasons)b::text[]) AS s(message_key, reason)
    WHERE inbox.pipeline = %(pipeline)s AND inbox.message_key = s.message_key AND inbox.status <> 'done'
)
INSERT INTO {table} AS r (source, id, occurred_at, inbox_seq, flow_run_id, ingested_at, deleted_at{every})
SELECT source, id, occurred_at, seq, %(flow_run_id)s, now(), CASE WHEN deleted THEN now() END{every}
FROM latest
ON CONFLICT ({conflict}) DO UPDATE SET
    source = EXCLUDED.source, id = EXCLUDED.id, occurred_at = EXCLUDED.occurred_at, inbox_seq = EXCLUDED.inbox_seq,
    flow_run_id = EXCLUDED.flow_run_id, ingested_at = EXCLUDED.ingested_at, deleted_at = EXCLUDED.deleted_at{updates}
WHERE (r.occurred_at, r.inbox_seq) <= (EXCLUDED.occurred_at, EXCLUDED.inbox_seq)
"""


def _statement(sink: Sink) -> sql.SQL:
    ident = {c.name: sql.Identifier(c.name).as_string() for c in sink.columns}
    written = [c for c in sink.columns if not c.from_inbox]
    # jsonb travels as text (one dump per value) and is cast in the statement.
    arrays = ["%(keys)b::text[]", "%(deleted)b::boolean[]"] + [
        f"%(c{i})b::{'text' if c.sql_type == 'jsonb' else c.sql_type}[]" for i, c in enumerate(written)]
    values = "".join(
        f", i.body -> 'data' AS {ident[c.name]}" if c.from_inbox
        else f", t.{ident[c.name]}{'::jsonb' if c.sql_type == 'jsonb' else ''} AS {ident[c.name]}"
        for c in sink.columns)
    key = "i.source, i.record_id" if sink.default_key else ", ".join(f"t.{ident[k]}" for k in sink.key)
    # A deletion keeps the row's last values: only its lineage and deleted_at change.
    updates = "".join(f",\n    {ident[c.name]} = CASE WHEN EXCLUDED.deleted_at IS NULL THEN EXCLUDED.{ident[c.name]} "
                      f"ELSE r.{ident[c.name]} END" for c in sink.columns if c.name not in sink.key)
    return sql.SQL(_WRITE.format(
        arrays=", ".join(arrays), written="".join(f", {ident[c.name]}" for c in written), values=values, key=key,
        table=sql.Identifier(sink.table).as_string(), every="".join(f", {ident[c.name]}" for c in sink.columns),
        conflict=", ".join(sql.Identifier(k).as_string() for k in sink.key), updates=updates,
    ))


_statements: dict[tuple, sql.Composed] = {}


def write(conn: psycopg.Connection, sink: Sink, rows: list[tuple[str, bool, dict[str, Any]]],
          skipped: dict[str, str], flow_run_id: UUID | None) -> None:
    """Upsert `rows` (message key, deleted, column values) and mark them done, mark `skipped`
    (message key -> reason) skipped: one statement, so one transaction."""
    if not rows and not skipped:
        return
    key = (sink.table, sink.key, sink.columns)
    if key not in _statements:
        _statements[key] = _statement(sink)
    written = [c for c in sink.columns if not c.from_inbox]
    params: dict[str, Any] = {
        "pipeline": sink.pipeline, "flow_run_id": flow_run_id,
        "keys": [k for k, _, _ in rows], "deleted": [d for _, d, _ in rows],
        "skipped_keys": list(skipped), "skipped_reasons": list(skipped.values()),
    }
    for i, c in enumerate(written):
        params[f"c{i}"] = [_adapt(c, values[c.name]) for _, _, values in rows]
    conn.execute(_statements[key], params)
