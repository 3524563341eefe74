"""The record envelope producers publish, and the one decode path that checks it.

`decode()` either returns a `Record` or raises `InvalidMessage` with a machine-readable
reason (the `x-error-reason` header of the dead letter) and a human-readable error.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError,
)

# Why a message is dead-lettered (`x-error-reason`). All but `id_conflict` come from decode();
# the inbox finds that one: a message id used again for another body.
Reason = Literal["not_utf8", "not_json", "not_object", "invalid", "too_large", "unsupported_content_type",
                 "id_conflict"]


class InvalidMessage(Exception):
    """A message that no retry can fix: it is dead-lettered on its first delivery."""

    def __init__(self, reason: Reason, error: str):
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339_string(value: Any) -> Any:
    # pydantic alone would also take epoch seconds, as numbers or strings, and dates
    # without seconds; the contract says RFC 3339 text with an offset.
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 timestamp with an offset, e.g. 2024-05-01T12:00:00Z")
    return value


def _within_utc_years(value: datetime) -> datetime:
    # Stored as timestamptz and read back in UTC: Python's datetime, which the flows read it
    # into, holds only years 1 to 9999, so 0001-01-01T00:00:00+01:00 would fail every run.
    try:
        value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("must fall within the years 1 to 9999 once converted to UTC") from None
    return value


Key = Annotated[StrictStr, Field(min_length=1, max_length=512)]


class Record(BaseModel):
    """One record as published: the record key is (source, id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Key = Field(description="Identifier of the record within its source.")
    source: Key = Field(description="System the record comes from.")
    type: Key = Field(description="Kind of record, e.g. `order.created`.")
    occurred_at: Annotated[AwareDatetime, BeforeValidator(_rfc3339_string), AfterValidator(_within_utc_years)] = Field(
        description="When it happened, RFC 3339 with a UTC offset; an older version never overwrites a newer one."
    )
    data: dict[str, Any] = Field(description="The payload, stored exactly as sent.")
    schema_version: StrictInt | None = Field(None, ge=1, description="Version of the payload's schema.")

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.id)


JSON_CONTENT_TYPES = {"application/json"}


def _check_content_type(content_type: str | None) -> None:
    if not content_type:
        return
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime not in JSON_CONTENT_TYPES and not mime.endswith("+json"):
        raise InvalidMessage("unsupported_content_type", f"content_type {content_type!r} is not JSON")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise InvalidMessage("unsupported_content_type", f"charset {value.strip()!r} is not UTF-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        # orjson refuses numbers beyond a double (1e400); they are valid JSON and PostgreSQL
        # stores them exactly, so give the standard parser a second look.
        try:
            value = json.loads(text, parse_constant=_reject_constant)
            orjson.dumps(value)  # still refuses lone surrogates, which PostgreSQL cannot store
        except (ValueError, TypeError, RecursionError):  # RecursionError: nesting deeper than orjson's limit
            raise InvalidMessage("not_json", f"body is not JSON: {exc}") from None
        return value


def _find_nul(value: Any) -> str | None:
    """The path of the first string (or key) holding U+0000, in document order, or None.

    A loop, not recursion: a body nested about a thousand levels deep (orjson takes 1,024)
    would otherwise end in a RecursionError instead of a refusal.
    """
    pending: list[tuple[Any, str]] = [(value, "")]
    while pending:
        value, path = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return path
        elif isinstance(value, dict):
            children = []
            for k, v in value.items():
                where = f"{path}.{k}" if path else k
                if "\x00" in k:
                    children.append((k, where))  # the key itself: a string holding U+0000
                    break
                children.append((v, where))
            pending.extend(reversed(children))
        elif isinstance(value, list):
            pending.extend(reversed([(v, f"{path}[{i}]") for i, v in enumerate(value)]))
    return None


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors(include_url=False):
        field = ".".join(str(p) for p in e["loc"]) or "(body)"
        if e["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown field (allowed: {', '.join(Record.model_fields)})")
        else:
            parts.append(f"{field}: {e['msg']}")
    return "; ".join(parts)


def decode(body: bytes, content_type: str | None = None, max_bytes: int | None = None) -> Record:
    """Check one message body against the contract; raise `InvalidMessage` on the first problem."""
    if max_bytes is not None and len(body) > max_bytes:
        raise InvalidMessage("too_large", f"body is {len(body)} bytes, the limit is {max_bytes}")
    _check_content_type(content_type)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage("not_utf8", f"body is not UTF-8: {exc}") from None
    value = _parse_json(text)
    if not isinstance(value, dict):
        raise InvalidMessage("not_object", f"body is a JSON {type(value).__name__}, not an object")
    # PostgreSQL's jsonb cannot hold U+0000; JSON can only carry it escaped.
    if "\\u0000" in text and (where := _find_nul(value)) is not None:
        raise InvalidMessage("invalid", f"{where}: contains U+0000, which cannot be stored")
    try:
        return Record.model_validate(value)
    except ValidationError as exc:
        raise InvalidMessage("invalid", _describe(exc)) from None


def message_key(body: bytes, message_id: str | None) -> str:
    """The inbox dedup key: the AMQP message_id when the producer set one, else the body's hash."""
    if message_id:
        return f"id:{message_id}"
    return "sha256:" + hashlib.sha256(body).hexdigest()


def json_schema() -> dict[str, Any]:
    schema = Record.model_json_schema()
    schema["$id"] = "urn:ingest:record-envelope"
    schema["description"] = (
        "One record, published to exchange `ingest` with the pipeline name as routing key. "
        "The record key is (source, id)."
    )
    return schema
