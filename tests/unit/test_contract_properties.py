"""Bad input, generated: whatever bytes, content type, size limit and message id a producer
sends, decode() returns a Record or raises InvalidMessage with a reason of the contract;
nothing else escapes to the consumer (which would treat it as a bug and return the message
until the delivery limit dead-letters it, with no reason)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from datetime import timedelta, timezone
from typing import get_args

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.contract import InvalidMessage, Reason, Record, decode, message_key

REASONS = set(get_args(Reason))

# Bounded: a few seconds per run, a different sample every run (failures print their seed).
BOUNDED = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
offsets = st.builds(lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60, 23 * 60))
timestamps = st.one_of(
    st.datetimes(timezones=offsets).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),  # no offset
    st.from_regex(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", fullmatch=True),
    json_values,
)
keys = st.text(max_size=8) | st.text(min_size=500, max_size=600) | scalars
envelopes = st.fixed_dictionaries(
    {"id": keys, "source": keys, "type": keys, "occurred_at": timestamps, "data": json_values},
    optional={"schema_version": scalars, "extra": json_values},
)


def serialized(value) -> bytes:
    """JSON as different producers write it: orjson, or the standard library (NaN, Infinity, escapes)."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value).encode()


def mutated(data: bytes, at: int, inserted: bytes) -> bytes:
    at %= len(data) + 1
    return data[:at] + inserted + data[at + 1:]


# Nesting around the 1,024 levels orjson takes, in a valid envelope, a string at the bottom.
deep_bodies = st.builds(
    lambda depth, text: b'{"id": "1", "source": "s", "type": "t", "occurred_at": "2024-05-01T00:00:00Z", '
                        b'"data": {"deep": ' + b"[" * depth + text + b"]" * depth + b"}}",
    st.integers(1000, 1040), st.sampled_from([b'"x"', b'"\\u0000"', b'{"a\\u0000": 1}']))
bodies = st.one_of(
    deep_bodies,
    st.binary(max_size=200),
    envelopes.map(serialized),
    json_values.map(serialized),
    st.builds(mutated, envelopes.map(serialized), st.integers(0, 400), st.binary(max_size=3)),
    st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(1, 3000)),  # nesting past any parser's limit
    st.builds(lambda n: b'{"id": "1", "source": "s", "type": "t", "occurred_at": "2024-05-01T00:00:00Z", '
                        b'"data": {"n": ' + n.encode() + b'}}', st.from_regex(r"-?\d{1,3}(\.\d+)?[eE][+-]?\d{3,7}",
                                                                              fullmatch=True)),
)
content_types = st.one_of(
    st.none(), st.text(max_size=40),
    st.sampled_from(["application/json", "application/cloudevents+json", "text/plain", "APPLICATION/JSON ; x=y"]),
    st.builds(lambda mime, charset: f"{mime}; charset={charset}", st.sampled_from(["application/json", "a/b+json"]),
              st.text(max_size=12)),
)


# Frames left to decode() in a consumer: Python's default recursion limit (1,000) less the
# consumer's own stack. Hypothesis raises the limit while it runs a test, which would hide a
# RecursionError that a consumer meets.
CONSUMER_HEADROOM = 950


@contextmanager
def consumer_stack():
    depth, frame = 0, sys._getframe()
    while frame:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + CONSUMER_HEADROOM)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def decodes_or_refuses_with_a_reason(body: bytes, content_type: str | None, max_bytes: int | None) -> None:
    try:
        with consumer_stack():
            record = decode(body, content_type, max_bytes)
    except InvalidMessage as refusal:
        assert refusal.reason in REASONS, refusal.reason
        assert refusal.error, "a refusal says what is wrong"
        return
    assert isinstance(record, Record)
    assert max_bytes is None or len(body) <= max_bytes


@BOUNDED
@given(body=bodies, content_type=content_types, max_bytes=st.none() | st.integers(0, 2000))
def test_decode_accepts_or_refuses_with_a_reason_of_the_contract(body, content_type, max_bytes):
    decodes_or_refuses_with_a_reason(body, content_type, max_bytes)


@settings(BOUNDED, max_examples=40)
@given(body=deep_bodies)
def test_decode_of_deeply_nested_bodies_refuses_or_accepts(body):
    """U+0000 a thousand levels down (orjson takes 1,024) ended in a RecursionError: not a refusal."""
    decodes_or_refuses_with_a_reason(body, None, None)


@BOUNDED
@given(body=st.binary(max_size=200), message_id=st.none() | st.text(max_size=60))
def test_every_message_has_a_dedup_key(body, message_id):
    key = message_key(body, message_id)
    assert key == message_key(body, message_id)
    assert key.startswith("id:" if message_id else "sha256:")
