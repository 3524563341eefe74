"""Committing a batch to the inbox: the one transaction between a batch's messages and their acks.

The commit is attempted until it succeeds while the database is down or refuses writes (the
messages stay in hand meanwhile); a value PostgreSQL refuses, and a message id the inbox
holds for another body, are dead-lettered so that they do not block their batch.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

import psycopg
from aio_pika.abc import AbstractIncomingMessage
from psycopg_pool import AsyncConnectionPool
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

from consumers import metrics
from consumers.deadletter import DeadLetterer
from consumers.delivery import channel_lost
from ingest import inbox
from ingest.contract import InvalidMessage
from ingest.inbox import Accepted
from ingest.pipelines import Pipeline
from ingest.settings import Settings

log = logging.getLogger(__name__)

Entry = tuple[Accepted, AbstractIncomingMessage]

# Longest wait between two attempts of a batch's inbox commit.
COMMIT_MAX_BACKOFF_SECONDS = 10.0


def _commit_can_succeed_later(exc: BaseException) -> bool:
    """Any database error but a value PostgreSQL refuses (that one is dead-lettered): the
    database down, or refusing every write (a revoked privilege, a trigger that raises, a
    missing table) until an operator fixes it."""
    return isinstance(exc, psycopg.Error) and not isinstance(exc, psycopg.DataError)


class InboxCommit:
    def __init__(self, pipeline: Pipeline, pool: AsyncConnectionPool, settings: Settings,
                 deadletterer: DeadLetterer, stopping: asyncio.Event):
        self.pipeline = pipeline
        self.pool = pool
        self.settings = settings
        self.deadletterer = deadletterer
        self.stopping = stopping

    async def commit(self, batch_id: UUID, entries: list[Entry]) -> tuple[list[Entry], int]:
        """Write the batch; return the entries to ack (the others are dead-lettered) and how
        many records were new. Raises only when the consumer stops (or its channel is lost)
        while the database still refuses: the caller returns the messages then."""
        entries, written = await self._store(batch_id, entries)
        return await self._dead_letter_conflicts(entries, written.conflicts), written.inserted

    async def _store(self, batch_id, entries: list[Entry]) -> tuple[list[Entry], inbox.Written]:
        """Commit the batch; return the entries written (refused ones dead-lettered) and what the write did."""
        try:
            return entries, await self._write(batch_id, entries)
        except psycopg.DataError:
            # A value PostgreSQL refuses that the contract check let through must not block
            # the batch: dead-letter those messages, write the others.
            entries = await self._dead_letter_refused(entries)
            return entries, (await self._write(batch_id, entries) if entries else inbox.Written(0, {}))

    async def _write(self, batch_id, entries: list[Entry]) -> inbox.Written:
        """The inbox transaction, attempted until it commits (or the consumer stops).

        The messages stay in hand, unacked, meanwhile: returning them would count a delivery
        each time, and a long outage would then reach the delivery limit and dead-letter good
        messages. In hand, they use up the consumer's credit (consumers/credit.py), which stops
        deliveries, and the next batch's flush waits for this commit: the consumer neither
        spins nor takes more.
        """
        async def write() -> inbox.Written:
            with metrics.INBOX_WRITE.labels(self.pipeline.name).time():
                async with self.pool.connection() as conn:
                    return await inbox.write_batch(
                        conn, self.pipeline.name, batch_id, [a for a, _ in entries],
                        self.settings.stuck_batch_seconds,
                    )

        def failed(state) -> None:
            metrics.COMMIT_FAILURES.labels(self.pipeline.name).inc()
            exc = state.outcome.exception()
            log.error("batch %s (%s): inbox commit failed (attempt %d), its %d message(s) held unacked, "
                      "retry in %.1fs: %s: %s", batch_id, self.pipeline.name, state.attempt_number, len(entries),
                      state.upcoming_sleep, type(exc).__name__, str(exc).strip())

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_commit_can_succeed_later),
            wait=wait_random_exponential(multiplier=0.5, max=COMMIT_MAX_BACKOFF_SECONDS),
            # Stopping, or the channel lost (the broker has the messages back): give the batch up.
            stop=lambda _: self.stopping.is_set() or all(channel_lost(m) for _, m in entries), reraise=True,
            sleep=self._pause, before_sleep=failed,
        ):
            with attempt:
                return await write()

    async def _pause(self, seconds: float) -> None:
        """A backoff that a stop cuts short (supervisord waits `stopwaitsecs`, not for the database)."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _dead_letter_conflicts(self, entries: list[Entry], conflicts: dict[int, str | None]) -> list[Entry]:
        """A message id used before for another body: the stored record stays, the newcomer is
        dead-lettered (acking it would drop it silently); the others go on."""
        for index, stored in conflicts.items():
            accepted, message = entries[index]
            await self.deadletterer.reject(message, InvalidMessage("id_conflict", (
                f"message id {message.message_id!r} was used before for another body: the inbox holds "
                f"sha256:{stored or '(not recorded: stored before migration 0005)'}, this body is "
                f"sha256:{accepted.body_sha256.hex()}")))
        return [entry for index, entry in enumerate(entries) if index not in conflicts]

    async def _dead_letter_refused(self, entries: list[Entry]) -> list[Entry]:
        kept = []
        async with self.pool.connection() as conn:
            for accepted, message in entries:
                refusal = await inbox.refusal(conn, accepted)
                if refusal is None:
                    kept.append((accepted, message))
                else:
                    await self.deadletterer.reject(message, InvalidMessage("invalid", f"PostgreSQL refused it: {refusal}"))
        return kept
