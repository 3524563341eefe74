"""The Prefect worker of `ingest worker`: Prefect's process worker, woken by PostgreSQL.

Prefect's worker learns of new flow runs only by polling its work pool (every
PREFECT_WORKER_QUERY_SECONDS; its websocket carries heartbeats and work-pool sync, not
runs), so a new run waited half a poll interval on average before a worker claimed it: one
of the largest parts of a record's latency at low rates. Consumers, and backfill runs, send
a NOTIFY (payload: the work pool) in the statement that records a batch's flow run
(ingest/inbox.py MARK_SUBMITTED), or as soon as they create a batch's run early
(announce_flow_run); each worker LISTENs on the ingest database and looks for scheduled
runs as soon as one arrives.

Polling stays, as the fallback: runs created by replays, schedules or the UI send no NOTIFY,
nor are those created while the listener is disconnected heard (it looks once on
reconnecting). The listener never stops the worker: with the database down it warns once,
reconnects with backoff, and the worker polls meanwhile.

Everything else is what `prefect worker start --type process` does (prefect/cli/worker.py):
the same worker class, settings and signal handling (SIGTERM stops it gracefully, a second
one kills it). The work pool is never created here: the server's bootstrap makes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import psycopg
from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
from prefect.utilities.processutils import setup_signal_handlers_worker
from prefect.workers.process import ProcessWorker
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from ingest.inbox import FLOW_RUN_CREATED_CHANNEL

log = logging.getLogger(__name__)

# How the listener's connection shows in pg_stat_activity.
APPLICATION_NAME = "ingest worker wake-up"
# A connection lost without a word (a host or network gone) is noticed within about a minute.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


class WakeableProcessWorker(ProcessWorker):
    """A ProcessWorker that also looks for scheduled runs when woken, never twice at once.

    Prefect's polling loop waits for each look-up before the next, but a wake-up would run
    beside it. Prefect keeps that safe (a run being submitted is skipped, the limiter refuses a
    run already holding a slot, the server refuses a second Pending), yet each overlap costs a
    query and may log a duplicate submission; one at a time, a look-up sees the runs the one
    before took. Wake-ups arriving during a look-up make one more after it, not one each.
    """

    # Prefect registers worker classes by this key; a key of our own keeps "process" Prefect's.
    @classmethod
    def __dispatch_key__(cls) -> str:
        return "ingest-process"

    def __init__(self, database_url: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._listener = WakeUpListener(database_url, self._work_pool_name, self)
        self._looking = asyncio.Lock()
        self._wanted = asyncio.Event()
        self._slots_were_full = False
        self._helpers: list[asyncio.Task] = []

    async def setup(self) -> None:
        await super().setup()
        self._helpers = [asyncio.create_task(self._answer_wake_ups(), name="wake-ups"),
                         asyncio.create_task(self._listener.run_forever(), name="wake-up listener")]

    async def teardown(self, *exc_info: Any) -> None:
        # First, so that no wake-up looks for runs while the worker is taken apart.
        for helper in self._helpers:
            helper.cancel()
        await asyncio.gather(*self._helpers, return_exceptions=True)
        await super().teardown(*exc_info)

    def wake(self) -> None:
        self._wanted.set()

    async def get_and_submit_flow_runs(self):
        """The polling loop's look-up (Prefect's method), in turn with the wake-ups'."""
        async with self._looking:
            return await self._look_for_runs()

    async def _look_for_runs(self):
        runs = await super().get_and_submit_flow_runs()
        # No slot left: runs may be waiting, Scheduled; the next run to end wakes us (run()).
        self._slots_were_full = self._limiter is not None and self._limiter.available_tokens == 0
        return runs

    async def run(self, *args: Any, **kwargs: Any):
        try:
            return await super().run(*args, **kwargs)
        finally:
            # Its slot is released as this returns, before the wake-up is served.
            if self._slots_were_full:
                self.wake()

    async def _answer_wake_ups(self) -> None:
        while True:
            await self._wanted.wait()
            async with self._looking:
                # Every wake-up until now, some during the look-up before, is served by this one.
                self._wanted.clear()
                try:
                    await self._look_for_runs()
                except Exception as exc:  # the Prefect API unreachable: the polling loop backs off and retries
                    log.warning("looking for flow runs on a wake-up failed, the next poll will: %s: %s",
                                type(exc).__name__, exc)


class WakeUpListener:
    """LISTENs for new flow runs of `work_pool` and wakes `worker`, reconnecting for as long as it runs."""

    def __init__(self, database_url: str, work_pool: str, worker: WakeableProcessWorker):
        self.database_url, self.work_pool, self.worker = database_url, work_pool, worker
        self.connection: psycopg.AsyncConnection | None = None
        self._warned = False

    async def run_forever(self) -> None:
        while True:
            try:
                await self._listen()
            except Exception as exc:  # psycopg's errors mostly; never let the listener die
                self._lost(exc)
            finally:
                if self.connection is not None:
                    await self.connection.close()
                    self.connection = None
            await asyncio.sleep(1)  # a connection that drops as soon as it is made is not tried in a loop

    async def _listen(self) -> None:
        self.connection = await self._connect()
        if self._warned:
            log.info("listening for new flow runs again")
            self._warned = False
        self.worker.wake()  # for the runs created while nobody listened
        async for notification in self.connection.notifies():
            if notification.payload == self.work_pool:
                self.worker.wake()

    async def _connect(self) -> psycopg.AsyncConnection:
        retrying = AsyncRetrying(wait=wait_exponential_jitter(initial=0.5, max=30),
                                 retry=retry_if_exception_type((psycopg.Error, OSError)),
                                 before_sleep=lambda state: self._lost(state.outcome.exception()))
        async for attempt in retrying:
            with attempt:
                connection = await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True, application_name=APPLICATION_NAME, **KEEPALIVES)
                try:
                    await connection.execute(f"LISTEN {FLOW_RUN_CREATED_CHANNEL}")
                except BaseException:
                    await connection.close()
                    raise
        return connection

    def _lost(self, exc: BaseException) -> None:
        """Warn once per outage, with its cause; the attempts after it stay quiet."""
        if not self._warned:
            log.warning("not listening for new flow runs (%s: %s): reconnecting with backoff; until then the "
                        "worker finds them by polling", type(exc).__name__, " ".join(str(exc).split()))
            self._warned = True


async def serve(name: str, work_pool: str, limit: int, database_url: str) -> None:
    """Run the worker, and its listener, until SIGTERM or SIGINT."""
    setup_signal_handlers_worker(os.getpid(), "the process worker", log.info)
    worker = WakeableProcessWorker(
        database_url,
        name=name,
        work_pool_name=work_pool,
        limit=limit,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
        create_pool_if_not_found=False,
    )
    try:
        await worker.start(printer=log.info)
    except asyncio.CancelledError:  # how the signal handlers stop it, as in `prefect worker start`
        log.info("worker %r stopped", worker.name)
