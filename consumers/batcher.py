"""Micro-batching by count, bytes, linger, idle time and a budget of runs: pure logic, no I/O."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ingest.pipelines import Batching

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items until a batch is full (records or bytes), its oldest item is too old,
    (with max_idle_ms) its newest item has waited that long for another, or (with
    max_runs_per_second) the last batch was taken long enough ago for the next to go.

    The budget is what makes a trickle fast: a record that finds the budget unspent goes at
    once instead of waiting out the linger, while a stream still makes at most that many
    batches (flow runs) a second, each holding what arrived since the last.
    """

    def __init__(self, limits: Batching, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.items: list[T] = []
        self.bytes = 0
        self.started_at: float | None = None
        self.last_added_at: float | None = None
        self.last_taken_at: float | None = None

    def add(self, item: T, size: int) -> None:
        self.last_added_at = self.clock()
        if not self.items:
            self.started_at = self.last_added_at
        self.items.append(item)
        self.bytes += size

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limits.max_records or self.bytes >= self.limits.max_bytes

    def seconds_left(self) -> float | None:
        """Time until the linger, idle or budget limit; None when empty (nothing to wait for)."""
        if self.started_at is None:
            return None
        deadline = self.started_at + self.limits.max_linger_ms / 1000
        if self.limits.max_idle_ms is not None:
            deadline = min(deadline, self.last_added_at + self.limits.max_idle_ms / 1000)
        if self.limits.max_runs_per_second > 0:
            budget_allows_at = self.started_at if self.last_taken_at is None else \
                self.last_taken_at + 1 / self.limits.max_runs_per_second
            deadline = min(deadline, max(self.started_at, budget_allows_at))
        return max(0.0, deadline - self.clock())

    @property
    def due(self) -> bool:
        return self.full or self.seconds_left() == 0.0

    def take(self) -> list[T]:
        items, self.items, self.bytes, self.started_at, self.last_added_at = self.items, [], 0, None, None
        self.last_taken_at = self.clock()
        return items
