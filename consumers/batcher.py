"""Micro-batching by count, bytes and linger: pure logic, no I/O."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ingest.pipelines import Batching

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items until a batch is full (records or bytes) or its oldest item is too old."""

    def __init__(self, limits: Batching, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.items: list[T] = []
        self.bytes = 0
        self.started_at: float | None = None

    def add(self, item: T, size: int) -> None:
        if not self.items:
            self.started_at = self.clock()
        self.items.append(item)
        self.bytes += size

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limits.max_records or self.bytes >= self.limits.max_bytes

    def seconds_left(self) -> float | None:
        """Time until the linger limit; None when empty (nothing to wait for)."""
        if self.started_at is None:
            return None
        return max(0.0, self.started_at + self.limits.max_linger_ms / 1000 - self.clock())

    @property
    def due(self) -> bool:
        return self.full or self.seconds_left() == 0.0

    def take(self) -> list[T]:
        items, self.items, self.bytes, self.started_at = self.items, [], 0, None
        return items
