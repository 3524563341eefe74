"""Micro-batching by count, bytes, linger and idle time: pure logic, no I/O."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ingest.pipelines import Batching

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items until a batch is full (records or bytes), its oldest item is too old,
    or (with max_idle_ms) its newest item has waited that long for another."""

    def __init__(self, limits: Batching, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.items: list[T] = []
        self.bytes = 0
        self.started_at: float | None = None
        self.last_added_at: float | None = None

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
        """Time until the linger (or idle) limit; None when empty (nothing to wait for)."""
        if self.started_at is None:
            return None
        deadline = self.started_at + self.limits.max_linger_ms / 1000
        if self.limits.max_idle_ms is not None:
            deadline = min(deadline, self.last_added_at + self.limits.max_idle_ms / 1000)
        return max(0.0, deadline - self.clock())

    @property
    def due(self) -> bool:
        return self.full or self.seconds_left() == 0.0

    def take(self) -> list[T]:
        items, self.items, self.bytes, self.started_at, self.last_added_at = self.items, [], 0, None, None
        return items
