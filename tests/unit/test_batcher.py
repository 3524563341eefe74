"""Micro-batching by count, bytes, linger and the budget of runs, driven by a fake clock."""

from __future__ import annotations

import pytest

from consumers.batcher import Batcher
from ingest.pipelines import Batching


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def batcher(clock) -> Batcher[str]:
    """Count, bytes and linger only (no budget of runs: tested below)."""
    return Batcher(Batching(max_records=3, max_bytes=100, max_linger_ms=500, max_runs_per_second=0), clock=clock)


def test_empty_batcher(batcher):
    assert batcher.items == []
    assert batcher.bytes == 0
    assert batcher.full is False
    assert batcher.due is False
    assert batcher.seconds_left() is None


def test_full_by_count(batcher):
    batcher.add("a", 1)
    batcher.add("b", 1)
    assert batcher.full is False
    assert batcher.due is False

    batcher.add("c", 1)

    assert batcher.full is True
    assert batcher.due is True


def test_full_by_bytes(batcher):
    batcher.add("a", 60)
    assert batcher.bytes == 60
    assert batcher.full is False

    batcher.add("b", 40)

    assert batcher.bytes == 100
    assert len(batcher.items) == 2
    assert batcher.full is True
    assert batcher.due is True


def test_one_oversized_item_fills_the_batch(batcher):
    batcher.add("big", 1000)

    assert batcher.full is True


def test_due_after_linger(batcher, clock):
    batcher.add("a", 1)
    clock.now += 0.499
    assert batcher.due is False

    clock.now += 0.001

    assert batcher.seconds_left() == 0.0
    assert batcher.full is False
    assert batcher.due is True


def test_seconds_left_counts_down_from_the_first_item(batcher, clock):
    batcher.add("a", 1)
    assert batcher.seconds_left() == pytest.approx(0.5)

    clock.now += 0.2
    batcher.add("b", 1)  # a later item does not restart the linger
    assert batcher.seconds_left() == pytest.approx(0.3)

    clock.now += 0.2
    assert batcher.seconds_left() == pytest.approx(0.1)

    clock.now += 5
    assert batcher.seconds_left() == 0.0


def test_take_returns_items_in_order_and_resets(batcher, clock):
    for item in ("a", "b", "c"):
        batcher.add(item, 10)

    assert batcher.take() == ["a", "b", "c"]

    assert batcher.items == []
    assert batcher.bytes == 0
    assert batcher.full is False
    assert batcher.due is False
    assert batcher.seconds_left() is None
    assert batcher.take() == []


def test_linger_restarts_for_the_next_batch(batcher, clock):
    batcher.add("a", 1)
    clock.now += 10
    assert batcher.due is True
    batcher.take()

    batcher.add("b", 1)

    assert batcher.due is False
    assert batcher.seconds_left() == pytest.approx(0.5)


def test_idle_limit_is_off_by_default(batcher, clock):
    batcher.add("a", 1)
    clock.now += 0.4

    assert batcher.seconds_left() == pytest.approx(0.1)


def test_due_once_no_item_arrived_for_the_idle_time(clock):
    batcher = Batcher(Batching(max_records=100, max_linger_ms=5000, max_idle_ms=200, max_runs_per_second=0), clock=clock)
    batcher.add("a", 1)
    clock.now += 0.15
    batcher.add("b", 1)  # each item restarts the idle time
    assert batcher.seconds_left() == pytest.approx(0.2)

    clock.now += 0.199
    assert batcher.due is False
    clock.now += 0.001

    assert batcher.due is True


def test_linger_still_bounds_a_batch_whose_items_keep_coming(clock):
    batcher = Batcher(Batching(max_records=100, max_linger_ms=500, max_idle_ms=200, max_runs_per_second=0), clock=clock)
    batcher.add("x", 1)
    for _ in range(7):  # steps exact in binary, so that the linger ends exactly
        clock.now += 0.0625
        batcher.add("x", 1)
    assert batcher.seconds_left() == pytest.approx(0.0625)  # linger: 0.5 - 0.4375; idle would give 0.2

    clock.now += 0.0625

    assert batcher.due is True


# --- the budget of runs -------------------------------------------------------------------


def budgeted(clock, **limits) -> Batcher[str]:
    return Batcher(Batching(**{"max_records": 100, "max_linger_ms": 1000, "max_runs_per_second": 2, **limits}),
                   clock=clock)


def test_a_record_that_finds_the_budget_unspent_goes_at_once(clock):
    batcher = budgeted(clock)
    batcher.add("a", 1)

    assert batcher.due is True
    assert batcher.seconds_left() == 0.0


def test_after_a_batch_the_next_waits_for_the_budget_not_the_linger(clock):
    batcher = budgeted(clock)
    batcher.add("a", 1)
    batcher.take()
    clock.now += 0.125
    batcher.add("b", 1)
    assert batcher.due is False
    assert batcher.seconds_left() == pytest.approx(0.375)  # 1/2 s after the last batch, not 1 s after "b"

    clock.now += 0.375

    assert batcher.due is True


def test_a_record_after_a_quiet_spell_goes_at_once(clock):
    batcher = budgeted(clock)
    batcher.add("a", 1)
    batcher.take()
    clock.now += 3

    batcher.add("b", 1)

    assert batcher.due is True


def test_a_stream_makes_at_most_the_budget_of_batches(clock):
    batcher = budgeted(clock, max_runs_per_second=4)
    batches = []
    for _ in range(400):  # 100 records a second for 4 s
        batcher.add("x", 1)
        if batcher.due:
            batches.append(len(batcher.take()))
        clock.now += 0.01
    assert len(batches) <= 4 * 4 + 1
    assert sum(batches) + len(batcher.items) == 400


def test_the_linger_still_bounds_a_budget_slower_than_it(clock):
    batcher = budgeted(clock, max_linger_ms=500, max_runs_per_second=0.5)
    batcher.add("a", 1)
    batcher.take()
    batcher.add("b", 1)

    assert batcher.seconds_left() == pytest.approx(0.5)


def test_a_full_batch_goes_whatever_the_budget(clock):
    batcher = budgeted(clock, max_records=2)
    batcher.add("a", 1)
    batcher.take()
    batcher.add("b", 1)
    batcher.add("c", 1)

    assert batcher.due is True


def test_no_budget_leaves_the_linger(clock):
    batcher = budgeted(clock, max_runs_per_second=0)
    batcher.add("a", 1)

    assert batcher.due is False
    assert batcher.seconds_left() == pytest.approx(1.0)


@pytest.mark.parametrize(("limits", "longest"), [
    ({"max_linger_ms": 1000, "max_runs_per_second": 1}, 1.0),
    ({"max_linger_ms": 600_000, "max_runs_per_second": 4}, 0.25),
    ({"max_linger_ms": 500, "max_runs_per_second": 0.5}, 0.5),
    ({"max_linger_ms": 12_000, "max_runs_per_second": 0, "max_idle_ms": 500}, 12.0),
])
def test_the_longest_a_batch_fills_bounds_every_wait_the_batcher_computes(clock, limits, longest):
    """What an early flow run's deadline is made of (consumers/consumer.py)."""
    batching = Batching(**limits)
    assert batching.longest_fill_seconds == pytest.approx(longest)
    batcher = Batcher(batching, clock=clock)
    batcher.add("a", 1)
    assert batcher.seconds_left() <= longest
    batcher.take()
    clock.now += 0.01
    batcher.add("b", 1)
    assert batcher.seconds_left() <= longest
