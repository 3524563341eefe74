"""Flow `backfill(pipeline, start, end, mode, by)`: reprocess a window of records.

It regroups the chosen records into batches owned by this run and creates one `ingest`
run per batch, at most `concurrency` at a time. Idempotency keys come from this run's id
and the batch, so retrying this run creates nothing new (it finds its batches and their
runs again), while a new backfill of the same window reprocesses.
"""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

from prefect import flow, get_client, get_run_logger, runtime
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Completed, Failed, State

import flows.engine_tuning  # noqa: F401  (before any run starts)
from ingest import db, inbox
from ingest.pipelines import BACKFILL_FLOW, load_pipeline
from ingest.settings import get_settings
from ingest.times import as_utc
from ingest.waiting import poll
from ingest.windows import Mode, TimeField, Window, assign_batches, previous_day, retention_note

POLL_SECONDS = 2.0


def _child_states(client, run_ids: list[UUID]) -> dict[UUID, State]:
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)), limit=len(run_ids))
    return {run.id: run.state for run in runs}


@flow(name=BACKFILL_FLOW, persist_result=False, validate_parameters=True)
def backfill(
    pipeline: str,
    start: datetime | None = None,
    end: datetime | None = None,
    mode: Mode = "failed",
    by: TimeField = "occurred",
    concurrency: int | None = None,
) -> State:
    """Reprocess the records of `pipeline` whose time falls in [start, end).

    mode `failed`: records that failed or are stuck (pending long after they arrived);
    `all`: every record in the window. By default the window is the UTC day before the
    run was scheduled; `by` picks occurred_at or received_at.
    """
    logger = get_run_logger()
    settings = get_settings()
    config = load_pipeline(settings.pipelines_file, pipeline)
    run_id = runtime.flow_run.id
    if start is None or end is None:
        default_start, default_end = previous_day(runtime.flow_run.scheduled_start_time)
        start, end = start or default_start, end or default_end
    window = Window(as_utc(start), as_utc(end), by)
    origin = f"backfill:{run_id}"
    with db.pool(settings.database_url).connection() as conn:
        batch_ids = assign_batches(conn, pipeline, origin, window, mode, config.stuck_after_seconds,
                                   config.batch.max_records)
    if not batch_ids:
        note = retention_note(window, config.inbox_retention_days, datetime.now(timezone.utc))
        return Completed(message=note or f"nothing to reprocess in {window} (mode {mode})")
    logger.info("backfill of %s, %s, mode %s: %d batch(es)", pipeline, window, mode, len(batch_ids))
    limit = concurrency or config.backfill_concurrency

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(config.deployment).id
        waiting, running, finished = list(batch_ids), {}, {}

        def advance() -> bool:
            """Collect the runs that ended, start more up to the limit; True once all ended."""
            if running:
                for child, state in _child_states(client, list(running)).items():
                    if state and state.is_final():
                        finished[running.pop(child)] = state
                failed = sum(1 for s in finished.values() if not s.is_completed())
                logger.info("backfill of %s: %d/%d batches done (%d failed), %d running",
                            pipeline, len(finished), len(batch_ids), failed, len(running))
            while waiting and len(running) < limit:
                batch_id = waiting.pop(0)
                run = client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={"pipeline": pipeline, "batch_id": str(batch_id)},
                    idempotency_key=f"{origin}:{batch_id}",
                    name=f"{pipeline}-backfill-{str(batch_id)[:8]}",
                    tags=["backfill"],
                )
                with db.pool(settings.database_url).connection() as conn:
                    conn.execute(inbox.MARK_SUBMITTED, {"batch_id": batch_id, "flow_run_id": run.id,
                                                      "work_pool": settings.work_pool, "announce": True})
                running[run.id] = batch_id
            return not running

        poll(advance, interval=POLL_SECONDS, what="the backfill's runs")

    failed = {str(b): s.name for b, s in finished.items() if not s.is_completed()}
    if failed:
        return Failed(message=f"{len(failed)} of {len(batch_ids)} batch run(s) did not complete: {failed}")
    return Completed(message=f"reprocessed {len(batch_ids)} batch(es) of {pipeline} in {window} (mode {mode})")
