"""Flow `ingest(pipeline, batch_id)`: process the batch's records that are not done yet.

Records travel through the inbox, never as parameters, so a retried run (UI "Retry",
`prefect flow-run retry`) re-reads its batch and processes only what is not done.

A run created before its batch's commit (an early run, consumers/submit.py) carries a
`commit_deadline`: it waits for the commit until then, and gives the batch up after it
(ingest/inbox.py, GIVE_UP_BATCH).
"""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime
from uuid import UUID

import psycopg
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_table_artifact
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

import flows.engine_tuning  # noqa: F401  (before any run starts)
from flows.steps import run_chunks, run_records
from ingest import db, inbox
from ingest.inbox import InboxRecord
from ingest.pipelines import INGEST_FLOW, load_pipeline
from ingest.settings import get_settings
from ingest.steps import load_program

ARTIFACT_ROWS = 1000


def _error_of(state: State) -> str:
    try:
        state.result()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return state.message or state.name


def _publish_failures(pipeline: str, batch_id: UUID, records: list[InboxRecord], failures: dict[str, str]) -> None:
    rows = [
        {"source": r.source, "id": r.id, "message_key": r.message_key, "error": failures[r.message_key]}
        for r in records
        if r.message_key in failures
    ]
    create_table_artifact(
        table=rows[:ARTIFACT_ROWS],
        key=re.sub(r"[^a-z0-9-]", "-", f"failed-records-{pipeline}"),
        description=(
            f"{len(rows)} record(s) of batch {batch_id} failed"
            + (f" (first {ARTIFACT_ROWS} listed)" if len(rows) > ARTIFACT_ROWS else "")
            + ". Retry this flow run to process them again; records already done are skipped."
        ),
    )


def _wait_for_commit(database_url: str, pipeline: str, batch_id: UUID, run_id: UUID | None, deadline: datetime,
                     logger) -> bool:
    """An early run's wait (inbox.wait_for_commit), through a restart of the database: the
    consumer waits one out before it commits, so giving up here would leave its batch
    committed under a run that failed."""
    pool = db.pool(database_url)
    while True:
        try:
            with pool.connection() as conn:
                return inbox.wait_for_commit(conn, pipeline, batch_id, run_id, deadline)
        except psycopg.OperationalError as exc:
            logger.warning("batch %s (%s): waiting for its commit, the database is unreachable (%s); "
                           "trying again in 1 s", batch_id, pipeline, str(exc).strip())
            time.sleep(1)


# Prefect's default runner starts a thread per task submitted and not yet running: a
# thousand for a batch in `record` granularity, all but a few waiting for a connection and
# all contending for the GIL. One thread per pooled connection does the same work faster.
TASK_RUNNER = ThreadPoolTaskRunner(max_workers=db.POOL_SIZE)


@flow(name=INGEST_FLOW, persist_result=False, validate_parameters=True, task_runner=TASK_RUNNER)
def ingest(pipeline: str, batch_id: UUID, commit_deadline: datetime | None = None) -> State:
    logger = get_run_logger()
    settings = get_settings()
    config = load_pipeline(settings.pipelines_file, pipeline)
    program = load_program(config, settings.pipelines_file)
    run_id = runtime.flow_run.id
    flow_run_id = UUID(str(run_id)) if run_id else None
    if commit_deadline is not None and not _wait_for_commit(
            settings.database_url, pipeline, batch_id, flow_run_id, commit_deadline, logger):
        return Completed(message=f"batch {batch_id}: given up before its commit, nothing to do (its "
                                 "records, if any, were committed in another batch)")
    with db.pool(settings.database_url).connection() as conn:
        records = inbox.load_unfinished(conn, pipeline, batch_id)
    if not records:
        return Completed(message=f"batch {batch_id}: every record already done")
    logger.info("batch %s (%s): processing %d record(s), granularity %s, steps %s",
                batch_id, pipeline, len(records), config.granularity, " -> ".join(program.dag.order))
    if config.granularity == "record":
        # Its INFO line "Finished in state Completed()" repeats each task run's state;
        # failures are still logged, at ERROR.
        logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
        run = run_records
    else:
        run = run_chunks
    settled = run(program, records, flow_run_id, _error_of)
    failures = settled.failures
    with db.pool(settings.database_url).connection() as conn:
        inbox.mark_failed(conn, pipeline, failures, flow_run_id)
    stored = len(records) - len(failures) - settled.skipped
    details = (f", {settled.skipped} skipped" if settled.skipped else "") + (
        f" ({settled.commits} commits)" if settled.commits else "")
    if failures:
        _publish_failures(pipeline, batch_id, records, failures)
        for key, error in list(failures.items())[:20]:
            logger.error("record %s failed: %s", key, error)
        return Failed(message=f"batch {batch_id}: {len(failures)} of {len(records)} record(s) failed, "
                              f"{stored} stored{details}")
    logger.info("batch %s (%s): %d record(s) stored%s", batch_id, pipeline, stored, details)
    return Completed(message=f"batch {batch_id}: {stored} record(s) stored{details}")
