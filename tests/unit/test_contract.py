"""The record envelope: what decode() accepts, and the reason it gives for what it refuses."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from ingest.contract import InvalidMessage, Record, decode, json_schema, message_key

VALID = {
    "id": "42",
    "source": "shop",
    "type": "order.created",
    "occurred_at": "2024-05-01T12:00:00Z",
    "data": {"total": 10},
}


def body(**changes) -> bytes:
    envelope = {**VALID, **changes}
    return json.dumps({k: v for k, v in envelope.items() if v is not ...}).encode()


def rejected(raw: bytes, **kwargs) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode(raw, **kwargs)
    return info.value


# --- accepted ---------------------------------------------------------------------------


def test_valid_envelope_without_schema_version():
    record = decode(body())

    assert record.id == "42"
    assert record.source == "shop"
    assert record.type == "order.created"
    assert record.occurred_at == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert record.data == {"total": 10}
    assert record.schema_version is None
    assert record.key == ("shop", "42")


def test_valid_envelope_with_schema_version():
    assert decode(body(schema_version=3)).schema_version == 3


def test_offset_is_kept_and_instant_is_exact():
    record = decode(body(occurred_at="2024-05-01T14:00:00+02:00"))

    assert record.occurred_at.utcoffset() == timedelta(hours=2)
    assert record.occurred_at == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


def test_unicode_survives_both_raw_and_escaped():
    raw = json.dumps({**VALID, "id": "näive-☃", "data": {"name": "Zoë 🚀"}}, ensure_ascii=False).encode()
    escaped = json.dumps({**VALID, "id": "näive-☃", "data": {"name": "Zoë 🚀"}}, ensure_ascii=True).encode()

    for payload in (raw, escaped):
        record = decode(payload)
        assert record.id == "näive-☃"
        assert record.data == {"name": "Zoë 🚀"}


def test_nested_data_is_kept_as_sent():
    data = {"items": [{"sku": "a", "qty": 2, "tags": ["x", None, True]}], "meta": {"deep": {"er": 1.5}}}

    assert decode(body(data=data)).data == data


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON; charset=\"UTF-8\"",
        "application/vnd.x+json",
        None,
    ],
)
def test_json_content_types_are_accepted(content_type):
    assert decode(body(), content_type=content_type).id == "42"


def test_body_exactly_at_the_limit_is_accepted():
    raw = body()

    assert decode(raw, max_bytes=len(raw)).id == "42"


def test_number_beyond_double_range_is_accepted():
    raw = body().replace(b'"total": 10', b'"total": 1e400')
    assert b"1e400" in raw

    record = decode(raw)

    assert record.id == "42"
    # A Python float cannot hold it; the inbox stores the body's text, which PostgreSQL casts exactly.
    assert record.data == {"total": float("inf")}


# --- rejected, with the reason ------------------------------------------------------------


def test_too_large():
    raw = body()

    error = rejected(raw, max_bytes=len(raw) - 1)

    assert error.reason == "too_large"
    assert str(len(raw)) in error.error
    assert str(len(raw) - 1) in error.error


@pytest.mark.parametrize(
    ("content_type", "named"),
    [("text/plain", "text/plain"), ("application/json; charset=latin-1", "latin-1")],
)
def test_unsupported_content_type(content_type, named):
    error = rejected(body(), content_type=content_type)

    assert error.reason == "unsupported_content_type"
    assert named in error.error


def test_not_utf8():
    raw = body().replace(b'"shop"', "\"caf\u00e9\"".encode("latin-1"))
    assert raw != body()

    error = rejected(raw)

    assert error.reason == "not_utf8"


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"{'id': 1}", b'{"data": NaN}', b"\xef\xbb\xbf{}"],
    ids=["empty", "truncated", "single-quotes", "nan", "bom"],
)
def test_not_json(raw):
    assert rejected(raw).reason == "not_json"


def test_lone_surrogate_escape_is_not_json():
    raw = body(data={"s": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"\\ud800")

    assert rejected(raw).reason == "not_json"


def test_escaped_surrogate_pair_is_fine():
    raw = body(data={"s": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"\\ud83d\\ude80")

    assert decode(raw).data == {"s": "🚀"}


@pytest.mark.parametrize(("raw", "kind"), [(b"[1, 2]", "list"), (b'"text"', "str"), (b"12", "int")])
def test_not_object(raw, kind):
    error = rejected(raw)

    assert error.reason == "not_object"
    assert kind in error.error


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"source": ...}, "source"),
        ({"data": ...}, "data"),
        ({"id": 42}, "id"),
        ({"source": None}, "source"),
        ({"type": ["order"]}, "type"),
        ({"occurred_at": 1714564800}, "occurred_at"),
        ({"occurred_at": "2024-05-01T12:00:00"}, "occurred_at"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": "0001-01-01T00:00:00+01:00"}, "occurred_at"),
        ({"occurred_at": "9999-12-31T23:00:00-02:00"}, "occurred_at"),
        ({"colour": "red"}, "colour"),
        ({"id": ""}, "id"),
        ({"id": "x" * 513}, "id"),
        ({"data": ["not", "an", "object"]}, "data"),
        ({"data": "text"}, "data"),
        ({"schema_version": 0}, "schema_version"),
        ({"schema_version": "1"}, "schema_version"),
        ({"schema_version": True}, "schema_version"),
    ],
    ids=[
        "missing-source", "missing-data", "id-int", "source-null", "type-list", "occurred_at-number",
        "occurred_at-no-offset", "occurred_at-garbage", "occurred_at-before-year-1-in-utc",
        "occurred_at-after-year-9999-in-utc", "unknown-field", "empty-id", "id-too-long",
        "data-list", "data-string", "schema_version-0", "schema_version-string", "schema_version-bool",
    ],
)
def test_invalid_names_the_field(changes, field):
    error = rejected(body(**changes))

    assert error.reason == "invalid"
    assert error.error.startswith(f"{field}: ")


def test_timestamp_at_the_edge_of_the_years_python_holds_is_accepted():
    assert decode(body(occurred_at="0001-01-01T00:00:00Z")).occurred_at.year == 1
    assert decode(body(occurred_at="9999-12-31T23:59:59+00:00")).occurred_at.year == 9999


def test_unknown_field_lists_the_allowed_ones():
    error = rejected(body(colour="red"))

    assert "unknown field" in error.error
    assert "id, source, type, occurred_at, data, schema_version" in error.error


def test_every_problem_is_reported():
    error = rejected(body(id=1, data=[]))

    assert error.reason == "invalid"
    assert "id: " in error.error
    assert "data: " in error.error


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"data": {"note": "a\u0000b"}}, "data.note"),
        ({"data": {"a": {"b": ["ok", "bad\u0000"]}}}, "data.a.b[1]"),
        ({"data": {"k\u0000": 1}}, "data.k\u0000"),
        ({"id": "4\u00002"}, "id"),
    ],
)
def test_nul_character_is_invalid_and_located(changes, where):
    raw = body(**changes)
    assert b"\\u0000" in raw

    error = rejected(raw)

    assert error.reason == "invalid"
    assert error.error.startswith(f"{where}: ")
    assert "U+0000" in error.error


def test_escaped_backslash_before_u0000_is_not_a_nul():
    record = decode(body(data={"path": "C:\\u0000"}))

    assert record.data == {"path": "C:\\u0000"}


def test_deeply_nested_body_is_not_json():
    raw = body(data={"n": "PLACEHOLDER"}).replace(b'"PLACEHOLDER"', b"[" * 5000 + b"]" * 5000)

    assert rejected(raw).reason == "not_json"


def test_epoch_seconds_as_string_is_invalid():
    error = rejected(body(occurred_at="1714564800"))

    assert error.reason == "invalid"
    assert error.error.startswith("occurred_at: ")


# --- message key, immutability, schema ---------------------------------------------------


def test_message_key_uses_message_id():
    assert message_key(body(), "m-1") == "id:m-1"


@pytest.mark.parametrize("message_id", [None, ""])
def test_message_key_falls_back_to_body_hash(message_id):
    raw = body()

    assert message_key(raw, message_id) == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_identical_bodies_share_a_key_and_different_ones_do_not():
    assert message_key(body(), None) == message_key(body(), None)
    assert message_key(body(), None) != message_key(body(id="43"), None)


def test_record_is_frozen():
    record = decode(body())

    with pytest.raises(ValidationError):
        record.id = "other"
    assert record.id == "42"


def test_json_schema():
    schema = json_schema()

    assert set(schema["required"]) == {"id", "source", "type", "occurred_at", "data"}
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"id", "source", "type", "occurred_at", "data", "schema_version"}
    assert schema["properties"]["occurred_at"]["format"] == "date-time"
    assert schema["properties"]["data"]["type"] == "object"
    assert schema["$id"] == "urn:ingest:record-envelope"
