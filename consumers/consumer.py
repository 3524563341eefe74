"""One consumer process: decode, dead-letter or batch, commit to the inbox, ack, submit.

Order of effects per batch: commit (inbox + batch row) -> ack -> create flow run. A crash
before the commit redelivers the messages; a crash after it leaves a pending batch that any
consumer submits later; a redelivered message that is already in the inbox is acked and
dropped by the dedup on its message key. The flow run may also be created early, as the
batch starts to fill (consumers/submit.py): it waits for the commit, and gives the batch up
if the commit does not come.
"""

from __future__ import annotations

import asyncio
import signal
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import TypeVar
from uuid import UUID, uuid4

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
import psycopg
from psycopg_pool import AsyncConnectionPool
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from consumers import metrics
from consumers.batcher import Batcher
from consumers.commit import Entry, InboxCommit
from consumers.credit import Credit, HeldBytesTooSmall, Windows, share
from consumers.deadletter import DeadLetterer
from consumers.delivery import channel_lost, give_back, label
from consumers.poison import PoisonGuard
from consumers.submit import Submitter
from consumers.topology import declare_topology
from ingest.contract import InvalidMessage, decode, message_key
from ingest.inbox import Accepted, BatchIdTaken
from ingest.pipelines import Pipeline
from ingest.settings import Settings

log = logging.getLogger(__name__)

# Test-only fault injection (`make faults`): when set, a message carrying this header kills
# the consumer process outright, as a crash in a C extension would, on every delivery.
# Never set in production.
CRASH_HEADER = os.environ.get("INGEST_TEST_CRASH_HEADER")

T = TypeVar("T")

# Early flow runs: only for batches that fill within this long at most (the shipped 1 s
# does): a run waiting for its commit holds a worker's slot, and a few pipelines that
# linger long would hold them all while committed batches wait. Each waits for its commit
# up to that time plus the grace, which covers the commit itself and the previous batch's
# (one at a time).
EARLY_RUN_MAX_FILL_SECONDS = 5.0
EARLY_RUN_GRACE_SECONDS = 10.0

class PipelineConsumer:
    """Consumes one pipeline's queue on its own channel; one batch commits at a time."""

    def __init__(self, pipeline: Pipeline, app: "Consumer", max_held_bytes: int):
        self.pipeline = pipeline
        self.app = app
        self.batcher: Batcher[Entry] = Batcher(pipeline.batch)
        self.incoming: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self.committing: asyncio.Task | None = None
        # The batch filling: its id, given when its first message joins, and its early run's creation.
        self.batch_id: UUID | None = None
        self.early_run: asyncio.Task | None = None
        self.credit = Credit(max_held_bytes, app.settings.max_message_bytes, pipeline.prefetch)

    async def start(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        self.channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self.deadletterer = DeadLetterer(self.channel, self.pipeline)
        self.guard = PoisonGuard(self.app.pool, self.pipeline.name)
        await self.deadletterer.start()
        self.committer = InboxCommit(self.pipeline, self.app.pool, self.app.settings, self.deadletterer,
                                     self.app.stopping)
        self.queue = await self.channel.get_queue(self.pipeline.queue, ensure=True)
        self.windows = Windows(self.pipeline.name, self.channel, self.queue, self.credit, self.incoming.put_nowait)
        await self.windows.start()
        self.loop_task = asyncio.create_task(self._loop(), name=f"consume-{self.pipeline.name}")

    async def stop_consuming(self) -> None:
        await self.windows.stop()

    async def drain(self) -> None:
        """After the consumer is cancelled: handle what was delivered, commit the last batch."""
        # Not cancel(): that could interrupt a commit or a dead-letter publish midway.
        await self.incoming.put(None)
        await asyncio.gather(self.loop_task, return_exceptions=True)
        while not self.incoming.empty():
            if (message := self.incoming.get_nowait()) is not None:
                await self._take(message)
        await self._flush()
        if self.committing:
            await self.committing

    async def _loop(self) -> None:
        while True:
            # A batch that is due but not full first takes what was delivered already (the
            # first record of a burst would otherwise go alone); it is full after at most
            # max_records of them.
            if not self.incoming.empty():
                message = self.incoming.get_nowait()
            else:
                try:
                    message = await asyncio.wait_for(self.incoming.get(), self.batcher.seconds_left())
                except TimeoutError:
                    await self._flush()
                    continue
            if message is None:  # drain() asks the loop to end
                return
            await self._take(message)
            # Once the broker sends nothing more until what is held is settled, waiting for the
            # batch to fill would only wait out its linger.
            if self.batcher.full or (self.incoming.empty() and (self.batcher.due or self.credit.stalled)):
                await self._flush()

    async def _take(self, message: AbstractIncomingMessage) -> None:
        """Handle a delivered message; unless it joined the batch, it leaves our hands here."""
        try:
            batched = await self._handle(message)
        except Exception:
            # A bug, not bad input: the message goes back, and the delivery limit
            # dead-letters it if it keeps failing; the messages around it go on.
            log.exception("message %s of %s: unexpected error, returned to the queue",
                          label(message), self.pipeline.name)
            await give_back(message)
            batched = False
        if not batched:
            self.windows.released([message])

    async def _handle(self, message: AbstractIncomingMessage) -> bool:
        """Whether it joined the batch (else it was settled or dropped)."""
        metrics.RECEIVED.labels(self.pipeline.name).inc()
        if message.redelivered:
            metrics.REDELIVERED.labels(self.pipeline.name).inc()
        if channel_lost(message):  # taken before a broker reconnect: see consumers/delivery.py
            log.info("message %s of %s: its channel was lost (broker reconnect); left to its redelivery",
                     label(message), self.pipeline.name)
            return False
        key = message_key(message.body, message.message_id)
        # A redelivered message may be the one a consumer died of: see consumers/poison.py.
        if message.redelivered and not await self._retrying(
                f"message {key[:40]}: poison check", lambda: self.guard.enter(key)):
            await self._return_poison(message, key)
            return False
        try:
            if CRASH_HEADER and CRASH_HEADER in (message.headers or {}):
                os.kill(os.getpid(), signal.SIGKILL)
            record = decode(message.body, message.content_type, self.app.settings.max_message_bytes)
        except InvalidMessage as exc:
            await self.deadletterer.reject(message, exc)
            return False
        finally:
            if message.redelivered:
                await self._retrying(f"message {key[:40]}: poison check", lambda: self.guard.leave(key))
        self.batcher.add((Accepted(key, record, message.body), message), len(message.body))
        if len(self.batcher.items) == 1:
            self._open_batch()
        return True

    def _open_batch(self) -> None:
        """A batch starts to fill: its id, and its flow run unless the batch may fill for long."""
        self.batch_id = uuid4()
        longest = self.pipeline.batch.longest_fill_seconds
        if self.app.settings.early_flow_runs and longest <= EARLY_RUN_MAX_FILL_SECONDS:
            deadline = datetime.now(timezone.utc) + timedelta(seconds=longest + EARLY_RUN_GRACE_SECONDS)
            self.early_run = self.app.submitter.start_early(self.batch_id, self.pipeline.name, deadline)

    async def _return_poison(self, message: AbstractIncomingMessage, key: str) -> None:
        """Return it untouched: the broker dead-letters it once it reaches the delivery limit."""
        deliveries = int((message.headers or {}).get("x-delivery-count", 0)) + 1
        log.error("message %s of %s: a consumer died handling it; returned untouched (delivery %d, limit %d)",
                  message.message_id or key[:40], self.pipeline.name, deliveries, self.pipeline.delivery_limit)
        if deliveries > self.pipeline.delivery_limit:  # this return dead-letters it: the note has served
            await self._retrying(f"message {key[:40]}: poison check", lambda: self.guard.leave(key))
        await give_back(message)

    async def _flush(self) -> None:
        if not self.batcher.items:
            return
        # One commit at a time keeps the order of batches; the next one fills meanwhile.
        if self.committing:
            await asyncio.shield(self.committing)
        batch_id, early_run, self.batch_id, self.early_run = self.batch_id, self.early_run, None, None
        self.committing = asyncio.create_task(self._commit(batch_id, early_run, self.batcher.take()))

    async def _commit(self, batch_id: UUID, early_run: asyncio.Task | None, taken: list[Entry]) -> None:
        entries = self._on_live_channel(batch_id, taken)
        outcome: tuple[list[Entry], int] | Exception | None = None
        try:
            if entries:
                try:
                    outcome = await self.committer.commit(batch_id, entries)
                except BatchIdTaken:  # rare: this commit came after the run's deadline
                    renamed = uuid4()
                    log.info("batch %s (%s): its early flow run gave it up before its commit; committed as batch %s",
                             batch_id, self.pipeline.name, renamed)
                    batch_id, early_run = renamed, None
                    outcome = await self.committer.commit(batch_id, entries)
        except Exception as exc:
            outcome = exc
        finally:
            # The batch leaves our hands before it is acked or returned: what the broker sends
            # once it has the ack counts against what is left (consumers/credit.py).
            self.windows.released([message for _, message in taken])
        if isinstance(outcome, Exception):
            # Only when stopping with the database still refusing, or a bug: the consumer
            # lives on, and the messages go back (one delivery each) for the next consumer.
            log.error("batch %s (%s): not committed (%s: %s); its %d message(s) returned to the queue",
                      batch_id, self.pipeline.name, type(outcome).__name__, outcome, len(entries),
                      exc_info=outcome if not isinstance(outcome, psycopg.Error) else None)
            for _, message in entries:
                await give_back(message)
        elif outcome and outcome[0]:  # else all refused by PostgreSQL or in conflict: dead-lettered
            if await self._acknowledge(batch_id, *outcome):
                self.app.submitter.submit_soon(batch_id, self.pipeline.name, early=early_run)
                return
        if early_run is not None:
            self.app.submitter.give_up_early(batch_id, self.pipeline.name, early_run,
                                             "given up by its consumer: no new record to commit")

    async def _acknowledge(self, batch_id, entries: list[Entry], inserted: int) -> bool:
        """Ack the batch's messages; whether it holds new records (then it needs its flow run)."""
        # One ack for the batch: every delivery on this channel up to its last one is the
        # batch's, the ones between them were settled when they were handled.
        try:
            await entries[-1][1].ack(multiple=True)
            metrics.ACKED.labels(self.pipeline.name).inc(len(entries))
        except Exception as exc:  # channel lost: the broker redelivers, the inbox dedups
            log.warning("batch %s (%s): ack failed after commit (%s); the redelivery of its %d message(s) will be "
                        "deduplicated", batch_id, self.pipeline.name, exc, len(entries))
        duplicates = len(entries) - inserted
        if not inserted:
            log.info("%d message(s) of %s already in the inbox (redelivered or published again): acked",
                     len(entries), self.pipeline.name)
            return False
        metrics.BATCHES_COMMITTED.labels(self.pipeline.name).inc()
        log.info(
            "batch %s (%s): %d records committed%s, messages %s..%s",
            batch_id, self.pipeline.name, inserted,
            f", {duplicates} duplicate(s) dropped" if duplicates else "",
            entries[0][0].message_key[:24], entries[-1][0].message_key[:24],
        )
        return True

    def _on_live_channel(self, batch_id, entries: list[Entry]) -> list[Entry]:
        """The entries whose channel is still open: the others are the broker's again."""
        live = [(accepted, message) for accepted, message in entries if not channel_lost(message)]
        if len(live) < len(entries):
            log.info("batch %s (%s): %d message(s) taken before a broker reconnect dropped; left to their "
                     "redelivery", batch_id, self.pipeline.name, len(entries) - len(live))
        return live

    @staticmethod
    async def _retrying(what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation` again for as long as the database is unreachable (nothing is acked meanwhile)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((psycopg.OperationalError, psycopg.InterfaceError)),
            wait=wait_random_exponential(multiplier=0.5, max=10),
            before_sleep=lambda rs: log.warning("%s failed, retrying: %s", what, rs.outcome.exception()),
        ):
            with attempt:
                return await operation()


class Consumer:
    """Owns the shared resources (connection, pool, Prefect client) from startup to shutdown."""

    def __init__(self, settings: Settings, pipelines: list[Pipeline]):
        self.settings = settings
        self.pipelines = pipelines
        self.stopping = asyncio.Event()
        # Each pipeline's part of the bound on held message bodies (consumers/credit.py).
        self.max_held_bytes = share(settings.consumer_max_held_bytes, settings.max_message_bytes, len(pipelines))

    async def startup(self) -> None:
        if self.settings.metrics_port:
            metrics.serve(self.settings.metrics_port + self.settings.consumer_index)
        self.pool = AsyncConnectionPool(
            self.settings.database_url, min_size=1, max_size=4, kwargs={"autocommit": True}, open=False
        )
        await self.pool.open(wait=True, timeout=30)
        self.connection = await aio_pika.connect_robust(
            self.settings.amqp_url,
            client_properties={"connection_name": f"ingest-consumer {socket.gethostname()} pid {os.getpid()}"},
        )
        await declare_topology(self.connection, self.pipelines)
        self.submitter = Submitter(self.pool, self.settings, {p.name: p for p in self.pipelines})
        await self.submitter.start()
        self.consumers = [PipelineConsumer(p, self, self.max_held_bytes) for p in self.pipelines]
        for consumer in self.consumers:
            await consumer.start(self.connection)
        log.info("consuming %s", ", ".join(p.queue for p in self.pipelines))

    async def shutdown(self) -> None:
        """Stop deliveries first, so in-flight batches finish and nothing new arrives."""
        log.info("stopping: cancelling consumers, finishing in-flight batches")
        self.stopping.set()  # also when a loop died: a commit being retried gives up
        try:
            for consumer in self.consumers:
                await consumer.stop_consuming()
            for consumer in self.consumers:
                await consumer.drain()
        finally:  # whatever happened to a batch, the shared resources are released
            await self.submitter.close(timeout=self.settings.submit_timeout_seconds)
            await self.connection.close()
            await self.pool.close()
        log.info("stopped")

    async def run(self) -> int:
        """Until asked to stop (0), or until a consume loop dies (1: supervisord restarts us)."""
        await self.startup()
        stop = asyncio.create_task(self.stopping.wait())
        loops = [task for c in self.consumers for task in (c.loop_task, c.windows.keeper)]
        try:
            done, _ = await asyncio.wait([stop, *loops], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            await self.shutdown()
        failed = [t for t in done if t is not stop and not t.cancelled() and t.exception()]
        for task in failed:
            log.critical("%s died: %r", task.get_name(), task.exception())
        return 1 if failed else 0


def run(settings: Settings, pipelines: list[Pipeline]) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""

    try:
        consumer = Consumer(settings, pipelines)
    except HeldBytesTooSmall as exc:
        raise SystemExit(f"ingest consumer: {exc}") from None

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, consumer.stopping.set)
        return await consumer.run()

    raise SystemExit(asyncio.run(main()))
