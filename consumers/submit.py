"""Creating each committed batch's flow run, and retrying the ones Prefect did not take.

A batch is submitted right after its commit; if Prefect is unreachable the batch stays
`pending` in PostgreSQL with a backoff, and a sweep (in every consumer) retries it. A batch
whose consumer died before submitting is picked up by the sweep once its lease expires.
The idempotency key is the batch id, so submitting twice still makes one flow run.

A batch's run may also be created early, as the batch starts to fill (start_early): it then
starts while the batch fills and waits for the commit (flows/ingest.py), so that a record
waits for the batch or for the run's start, not for both. The same idempotency key makes
it the run a later submission of the batch finds.

A run can also be lost after its creation: a worker claims it (Pending) and dies before it
starts it, and Prefect leaves it Pending for ever. The consumers schedule such runs again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import datetime, timedelta, timezone
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Pending, Scheduled
from psycopg_pool import AsyncConnectionPool

from consumers import metrics
from ingest import inbox
from ingest.pipelines import Pipeline
from ingest.settings import Settings

log = logging.getLogger(__name__)


# 2 ** 1024 overflows a float: a batch Prefect refused that often (a deployment deleted for
# weeks) must still be deferred. Past this exponent every cap in use is reached anyway.
MAX_BACKOFF_EXPONENT = 32

# Abandoned runs are read this many at a time, until a page comes back short.
ABANDONED_PAGE = 200
# The Pending sub-state a consumer claims an abandoned run with before scheduling it again
# (see Submitter._reschedule); two names, so that a claim left behind can be claimed again.
CLAIMS = ("Rescheduling", "Rescheduling again")


def backoff_seconds(attempts: int, cap: float) -> float:
    """Exponential backoff with jitter: about 1, 2, 4 ... seconds, capped."""
    return random.uniform(0.5, 1.0) * min(cap, 2.0 ** min(attempts, MAX_BACKOFF_EXPONENT))


class Submitter:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings, pipelines: dict[str, Pipeline]):
        self.pool = pool
        self.settings = settings
        self.pipelines = pipelines
        self.client: PrefectClient | None = None
        self.deployment_ids: dict[str, UUID] = {}
        self.in_flight: set[asyncio.Task] = set()
        self.sweeper: asyncio.Task | None = None
        self.gauges: asyncio.Task | None = None
        self.rescuer: asyncio.Task | None = None

    async def start(self) -> None:
        self.client = get_client()
        await self.client.__aenter__()
        self.sweeper = asyncio.create_task(self._sweep_forever(), name="submit-sweep")
        # Apart from the sweep, which waits on Prefect for as long as it is down.
        self.gauges = asyncio.create_task(self._measure_backlog_forever(), name="backlog-gauges")
        self.rescuer = asyncio.create_task(self._reschedule_abandoned_forever(), name="abandoned-runs")

    async def close(self, timeout: float) -> None:
        """Let submissions in flight finish (those that do not stay pending), then close."""
        for task in (self.sweeper, self.gauges, self.rescuer):
            if task:
                task.cancel()
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=timeout)
        if self.client:
            await self.client.__aexit__(None, None, None)

    def submit_soon(self, batch_id: UUID, pipeline: str, attempts: int = 0,
                    early: asyncio.Task | None = None) -> None:
        """Submit a committed batch; `early`: its early run's creation (start_early), if any."""
        self._track(self._submit(batch_id, pipeline, attempts, early))

    def start_early(self, batch_id: UUID, pipeline: str, commit_deadline: datetime) -> asyncio.Task:
        """Create the run of a batch that is still filling; the task gives its id, or None if
        Prefect did not take it (the batch's submission after its commit then tries again)."""
        async def create() -> UUID | None:
            try:
                flow_run_id = await asyncio.wait_for(self._create_run(batch_id, pipeline, commit_deadline),
                                                     self.settings.submit_timeout_seconds)
            except Exception as exc:  # Prefect down or slow: the submission logs it, if the batch is committed
                log.debug("batch %s (%s): early flow run not created: %s: %s", batch_id, pipeline,
                          type(exc).__name__, exc)
                return None
            try:
                async with self.pool.connection() as conn:
                    await inbox.announce_flow_run(conn, self.settings.work_pool)
            except Exception as exc:  # the database down: a worker's poll finds the run
                log.debug("batch %s (%s): early flow run %s not announced: %s: %s", batch_id, pipeline,
                          flow_run_id, type(exc).__name__, exc)
            return flow_run_id
        return self._track(create())

    def give_up_early(self, batch_id: UUID, pipeline: str, early: asyncio.Task, reason: str) -> None:
        """The batch will not be committed: let its early run, if it was created, end now
        rather than at its deadline."""
        async def give_up() -> None:
            if (flow_run_id := await early) is None:
                return
            try:
                async with self.pool.connection() as conn:
                    await inbox.give_up_batch(conn, pipeline, batch_id, flow_run_id, reason)
            except Exception as exc:  # the run gives it up itself at its deadline
                log.warning("batch %s (%s): early flow run %s not told that the batch is given up (%s: %s); it "
                            "ends at its deadline", batch_id, pipeline, flow_run_id, type(exc).__name__, exc)
        self._track(give_up())

    def _track(self, coroutine) -> asyncio.Task:
        """A task that close() waits for."""
        task = asyncio.create_task(coroutine)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        return task

    async def _deployment_id(self, pipeline: str) -> UUID:
        if pipeline not in self.deployment_ids:
            deployment = await self.client.read_deployment_by_name(self.pipelines[pipeline].deployment)
            self.deployment_ids[pipeline] = deployment.id
        return self.deployment_ids[pipeline]

    async def _create_run(self, batch_id: UUID, pipeline: str, commit_deadline: datetime | None = None) -> UUID:
        deployment_id = await self._deployment_id(pipeline)
        parameters = {"pipeline": pipeline, "batch_id": str(batch_id)}
        if commit_deadline is not None:
            parameters["commit_deadline"] = commit_deadline.isoformat()
        run = await self.client.create_flow_run_from_deployment(
            deployment_id,
            parameters=parameters,
            idempotency_key=str(batch_id),
            name=f"{pipeline}-{str(batch_id)[:8]}",
        )
        return run.id

    async def _submit(self, batch_id: UUID, pipeline: str, attempts: int, early: asyncio.Task | None = None) -> None:
        try:
            flow_run_id = early_run_id = await early if early else None
            if flow_run_id is None:
                flow_run_id = await asyncio.wait_for(
                    self._create_run(batch_id, pipeline), self.settings.submit_timeout_seconds
                )
        except Exception as exc:  # Prefect down, slow or misconfigured: the batch waits in PostgreSQL
            metrics.SUBMIT_FAILURES.labels(pipeline).inc()
            self.deployment_ids.pop(pipeline, None)
            delay = backoff_seconds(attempts, self.settings.submit_max_backoff_seconds)
            error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "batch %s (%s): flow run not created (attempt %d), retry in %.1fs: %s",
                batch_id, pipeline, attempts + 1, delay, error,
            )
            async with self.pool.connection() as conn:
                await inbox.defer_batch(conn, batch_id, error, delay)
            return
        async with self.pool.connection() as conn:
            since_commit = await inbox.mark_submitted(conn, batch_id, flow_run_id, self.settings.work_pool,
                                                      announce=early_run_id is None)
        metrics.BATCHES_SUBMITTED.labels(pipeline).inc()
        if since_commit is not None:
            metrics.COMMIT_TO_FLOW_RUN.labels(pipeline).observe(since_commit)
        log.info("batch %s (%s): flow run %s created", batch_id, pipeline, flow_run_id)

    async def _sweep_forever(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("submission sweep failed; next sweep in %.0fs", interval)

    async def sweep(self) -> None:
        """Lease the batches that are due and submit each; one that fails does not stop the others."""
        async with self.pool.connection() as conn:
            due = await inbox.claim_due_batches(conn, list(self.pipelines), self.settings.stuck_batch_seconds)
        for batch_id, pipeline, attempts in due:
            try:
                await self._submit(batch_id, pipeline, attempts)
            except Exception:  # its lease expires and a later sweep tries it again
                log.exception("batch %s (%s): submission failed; retried once its lease expires", batch_id, pipeline)

    async def _measure_backlog_forever(self, interval: float = 5.0) -> None:
        """Keep the backlog gauges (pending batches, oldest unprocessed record) current."""
        while True:
            try:
                async with self.pool.connection() as conn:
                    for name, (batches, age) in (await inbox.backlog(conn, list(self.pipelines))).items():
                        metrics.BATCHES_PENDING.labels(name).set(batches)
                        metrics.OLDEST_PENDING_RECORD.labels(name).set(age)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database down: the gauges keep their last values
                log.warning("backlog gauges not updated: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(interval)

    async def _reschedule_abandoned_forever(self) -> None:
        """Schedule again the runs a worker claimed and died before starting (see the module doc).

        Every consumer does it; a run another one rescheduled is no longer Pending. Should a
        run whose worker was only slow start after all, it runs once more: harmless, a run
        processes what is not done.
        """
        interval = min(30.0, self.settings.abandoned_run_seconds / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rescue()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Prefect down: the next round will do
                log.warning("abandoned flow runs not checked: %s: %s", type(exc).__name__, exc)

    async def rescue(self) -> None:
        """One round: schedule again every run abandoned in Pending."""
        for run in await self._abandoned_runs():
            await self._reschedule(run)

    async def _abandoned_runs(self) -> list[FlowRun]:
        """Every run of our deployments Pending for longer than `abandoned_run_seconds`, read
        page by page before any is rescheduled (which would move the pages under us)."""
        deployments = [await self._deployment_id(pipeline) for pipeline in self.pipelines]
        since = datetime.now(timezone.utc) - timedelta(seconds=self.settings.abandoned_run_seconds)
        abandoned, offset = [], 0
        while True:
            page = await self.client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployments)),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING]))),
                sort=FlowRunSort.ID_DESC, limit=ABANDONED_PAGE, offset=offset,
            )
            abandoned += [run for run in page if run.state and run.state.timestamp < since]
            if len(page) < ABANDONED_PAGE:
                return abandoned
            offset += len(page)

    async def _reschedule(self, run: FlowRun) -> None:
        """Claim the run, then schedule it: two transitions Prefect orchestrates, none forced.

        No rule of Prefect's refuses Scheduled from Running, so Scheduled alone would not do.
        But Prefect refuses a move to Pending from Running, Cancelling or Cancelled, and from
        Pending to Pending of the same name (PreventPendingTransitions: what keeps two
        workers from submitting one run). So the claim, a Pending sub-state of our own name,
        is refused when the run moved on after we read it, e.g. its worker, slow rather than
        dead, started it; forcing Scheduled, as before, sent such a run back to run again.
        Prefect still lets a claimed run start (Pending to Running) until it is Scheduled:
        a window of one API call, which no unforced transition closes.
        """
        message = f"Pending since {run.state.timestamp:%H:%M:%S} UTC: its worker is gone; scheduled again"
        claim_name = CLAIMS[1] if run.state.name == CLAIMS[0] else CLAIMS[0]
        claim = await self.client.set_flow_run_state(run.id, Pending(name=claim_name, message=message))
        if claim.status != SetStateStatus.ACCEPT:
            log.info("flow run %s (%s): moved on since it was read, left alone (%s)",
                     run.id, run.name, claim.details.reason)
            return
        scheduled = await self.client.set_flow_run_state(run.id, Scheduled(message=message))
        if scheduled.status != SetStateStatus.ACCEPT:  # still claimed: the next round tries again
            log.warning("flow run %s (%s): claimed but not scheduled again (%s: %s)",
                        run.id, run.name, scheduled.status.value, scheduled.details.reason)
            return
        log.warning("flow run %s (%s): %s", run.id, run.name, message)
