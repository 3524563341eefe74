"""The credit a consumer gives the broker: windows of messages within a bound on held bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from consumers.credit import Credit, HeldBytesTooSmall, share

M = 1000  # the largest message


def test_a_window_is_half_what_the_bound_holds_of_the_largest_messages_and_at_most_the_count_limit():
    assert Credit(max_bytes=17 * M + 999, max_message_bytes=M, max_messages=100).window == 8  # two, and one
    assert Credit(max_bytes=1000 * M, max_message_bytes=M, max_messages=100).window == 100
    assert Credit(max_bytes=2 * M, max_message_bytes=M, max_messages=100).window == 1


def test_large_messages_fill_two_windows_then_stall_until_some_are_settled():
    credit = Credit(max_bytes=5 * M, max_message_bytes=M, max_messages=100)
    for window in ("w1", "w2"):
        assert credit.wants_window
        credit.closed()
        credit.opened(window)
        for _ in range(2):
            credit.taken(window, M - 10)
        assert credit.used_up
    assert credit.stalled and credit.held_back_by_bytes and credit.bytes == 4 * (M - 10)
    assert not credit.wants_window  # no room for another window: the open one stays, refilled as it is acked
    credit.released("w1", M - 10)  # of a cancelled window: still no room for a whole new one
    assert credit.stalled
    credit.released("w2", M - 10)
    assert not credit.used_up and not credit.stalled and credit.bytes == 2 * (M - 10)


def test_small_messages_rotate_windows_until_the_count_limit():
    credit = Credit(max_bytes=5 * M, max_message_bytes=M, max_messages=10)
    windows = 0
    while credit.wants_window:
        if credit.tag:
            credit.closed()  # cancelled: what it was sent stays in hand
        windows += 1
        credit.opened(f"w{windows}")
        while not credit.used_up:
            credit.taken(credit.tag, 10)
    assert (windows, credit.messages, credit.bytes) == (5, 10, 100)  # opened while fewer than 10 were held
    assert credit.stalled and not credit.held_back_by_bytes
    credit.released("w1", 10)
    assert credit.wants_window  # fewer than 10 held again: rotate to a new window
    credit.released("w5", 10)  # of the open window: it has credit again
    assert not credit.used_up and not credit.stalled


def test_a_window_lost_with_its_channel_leaves_its_messages_in_hand_until_dropped():
    credit = Credit(max_bytes=3 * M, max_message_bytes=M, max_messages=100)
    credit.opened("w1")
    credit.taken("w1", M)
    credit.closed()
    credit.opened("w2")
    credit.taken("w2", M)
    credit.closed()  # the channel reopened after a broker reconnect
    assert credit.stalled and not credit.wants_window  # not another window on top of what is still in hand
    credit.released("w1", M)
    credit.released("w2", M)
    assert credit.wants_window and credit.bytes == 0


def test_the_bound_keeps_room_for_the_next_message_of_one_acked_but_not_yet_released():
    credit = Credit(max_bytes=5 * M, max_message_bytes=M, max_messages=100)  # windows of 2
    opened = 0
    for size in (1, 1, M, M, M, M):  # two tiny messages, then messages of the largest size
        if credit.wants_window:
            credit.closed()
            opened += 1
            credit.opened(f"w{opened}")
        if not credit.used_up:
            credit.taken(credit.tag, size)
    # A third window of two would fit the bound, but then the broker could replace one of its
    # messages dead-lettered by the consume loop before the loop has released it.
    assert (opened, credit.bytes, credit.stalled) == (2, 2 * M + 2, True)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["deliver", "release", "settle", "keep"]),
                          st.one_of(st.just(M), st.integers(1, M)),  # the largest size often
                          st.integers(0, 10_000)), max_size=300),
       st.integers(2 * M, 20 * M), st.integers(1, 40))
def test_whatever_the_broker_sends_and_whenever_messages_are_settled_the_bound_holds(steps, max_bytes, max_messages):
    """A broker that sends each open window up to its prefetch, of any size up to the largest.

    "release": a batch's message, released before its ack; "settle": the consume loop's one
    message, acked (the broker may send the next) a moment before it is released.
    """
    credit = Credit(max_bytes, M, max_messages)
    held: list[tuple[str, int]] = []
    unacked: dict[str, int] = {}  # the broker's count per window
    settled: tuple[str, int] | None = None  # acked, not yet released
    opened = 0
    for action, size, pick in steps:
        if action == "keep" and credit.wants_window:
            if credit.tag:
                credit.closed()
            if credit.wants_window:
                opened += 1
                credit.opened(f"w{opened}")
        elif action == "deliver" and credit.tag and unacked.get(credit.tag, 0) < credit.window:
            unacked[credit.tag] = unacked.get(credit.tag, 0) + 1
            held.append((credit.tag, size))
            credit.taken(credit.tag, size)
        elif action == "release" and held:
            tag, released = held.pop(pick % len(held))
            unacked[tag] -= 1
            credit.released(tag, released)
        elif action == "settle" and settled is None and held:
            settled = held.pop(pick % len(held))
            unacked[settled[0]] -= 1
        elif action == "settle" and settled is not None:
            credit.released(*settled)
            settled = None
        in_memory = sum(s for _, s in held) + (settled[1] if settled else 0)
        assert credit.bytes == in_memory <= max_bytes
        assert credit.messages == len(held) + (settled is not None) < max_messages + credit.window + 1


def test_each_pipeline_of_a_consumer_gets_an_equal_part_that_must_hold_two_messages():
    assert share(12 * M, M, 3) == 4 * M
    with pytest.raises(HeldBytesTooSmall, match=r"INGEST_CONSUMER_MAX_HELD_BYTES \(5000\) is shared by the 3 "
                                                r"pipelines.*raise it to at least 6000"):
        share(5 * M, M, 3)


def test_the_setting_refuses_a_bound_smaller_than_two_messages_of_the_largest_size():
    from pydantic import ValidationError

    from ingest.settings import Settings

    assert Settings(max_message_bytes=M, consumer_max_held_bytes=2 * M).consumer_max_held_bytes == 2 * M
    with pytest.raises(ValidationError, match=r"INGEST_CONSUMER_MAX_HELD_BYTES \(1999\) must be at least twice "
                                              r"INGEST_MAX_MESSAGE_BYTES \(1000\)"):
        Settings(max_message_bytes=M, consumer_max_held_bytes=2 * M - 1)
