"""A producer that keeps publishing while a fault is injected, and remembers what it sent.

Like a careful real producer it publishes with confirms and `mandatory`, and publishes a
message again (same message id) when the broker did not confirm it (consumers/publisher.py).
It records every message id it attempted and every one the broker confirmed: the suite's
counts are made against these two sets.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson

from consumers.publisher import Publisher

# Enough retries to outlast a broker restart (the backoff tops out at 5 s between them).
PUBLISH_RETRIES = 40
IN_FLIGHT = 100


INVALID = b'{"id": "not json'  # dead-lettered as not_json on its first delivery


def envelope(source: str, i: int) -> bytes:
    return orjson.dumps({"id": str(i), "source": source, "type": "fault.test",
                         "occurred_at": datetime.now(timezone.utc).isoformat(), "data": {"i": i, "note": "Grüße"}})


@dataclass
class Special:
    """A message other than the plain records: e.g. the poison, with the headers that make it one."""

    index: int
    headers: dict


@dataclass
class Producer:
    """Publishes records 0..count-1 of `source` to `pipeline`, evenly over `seconds`, in a thread.

    `copies` producers (connections) publish every record concurrently, each with the same
    message id. Message ids are `<source>-<i>`, the record id is `i`.
    """

    amqp_url: str
    pipeline: str
    source: str
    count: int
    seconds: float
    copies: int = 1
    special: Special | None = None
    invalid: frozenset[int] = frozenset()  # records published with a body that is not JSON
    attempted: set[str] = field(default_factory=set)
    confirmed: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    bodies: dict[int, bytes] = field(default_factory=dict)  # record i's body, the same for every copy

    def message_id(self, i: int) -> str:
        return f"{self.source}-{i}"

    def start(self) -> "Producer":
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), name=f"producer {self.source}")
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join()

    async def _run(self) -> None:
        await asyncio.gather(*(self._publish_all(copy) for copy in range(self.copies)))

    async def _publish_all(self, copy: int) -> None:
        slots = asyncio.Semaphore(IN_FLIGHT)
        started = time.monotonic()
        async with Publisher(self.amqp_url, retries=PUBLISH_RETRIES,
                             connection_name=f"fault producer {self.source} #{copy}") as publisher:

            async def send(i: int) -> None:
                message_id = self.message_id(i)
                headers = self.special.headers if self.special and self.special.index == i else None
                self.attempted.add(message_id)  # before the first try: it may be stored unconfirmed
                try:
                    # One body per record: copies of it under its one message id are duplicates,
                    # where another body under that id would be an id conflict (dead-lettered).
                    body = INVALID if i in self.invalid else self.bodies.setdefault(i, envelope(self.source, i))
                    await publisher.publish(body, self.pipeline, message_id=message_id, headers=headers)
                    self.confirmed.add(message_id)
                except Exception as exc:  # given up after every retry: attempted, not confirmed
                    self.errors[message_id] = f"{type(exc).__name__}: {exc}"
                finally:
                    slots.release()

            tasks = []
            for i in range(self.count):
                delay = started + i * self.seconds / self.count - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                tasks.append(asyncio.create_task(send(i)))
            await asyncio.gather(*tasks)
