"""Flow `ingest(pipeline, batch_id)`: process the batch's records that are not done yet.

Records travel through the inbox, never as parameters, so a retried run (UI "Retry",
`prefect flow-run retry`) re-reads its batch and processes only what is not done.
"""

from __future__ import annotations

import logging
import re
from uuid import UUID

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_table_artifact
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.recording import submit_within_window
from ingest import db, inbox
from ingest.inbox import InboxRecord
from ingest.pipelines import INGEST_FLOW, Pipeline, load_pipeline
from ingest.settings import get_settings
from tasks.process import process_chunk, process_record

ARTIFACT_ROWS = 1000


def _run_per_record(records: list[InboxRecord], pipeline: Pipeline, run_id: UUID) -> dict[str, str]:
    task = process_record.with_options(
        retries=pipeline.task_retries, retry_delay_seconds=pipeline.task_retry_delay_seconds
    )
    # Per record, Prefect's own costs dominate; two of them buy nothing here. Its INFO line
    # "Finished in state Completed()" repeats the task run's state (failures are still
    # logged, at ERROR). And quote() keeps it from walking the parameters for futures:
    # there are none, and the walk costs about 0.4 ms a record.
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    futures = submit_within_window(task, ((quote(record), quote(pipeline), run_id) for record in records), run_id)
    failures = {}
    for record, future in zip(records, futures):
        future.wait()
        if not future.state.is_completed():
            failures[record.message_key] = _error_of(future.state)
    return failures


def _run_per_chunk(records: list[InboxRecord], pipeline: Pipeline, run_id: UUID) -> dict[str, str]:
    task = process_chunk.with_options(
        retries=pipeline.task_retries, retry_delay_seconds=pipeline.task_retry_delay_seconds
    )
    chunks = [records[i : i + pipeline.chunk_size] for i in range(0, len(records), pipeline.chunk_size)]
    futures = [task.submit(chunk, pipeline, run_id) for chunk in chunks]
    failures = {}
    for chunk, future in zip(chunks, futures):
        future.wait()
        if future.state.is_completed():
            failures.update(future.result())
        else:  # the whole chunk's transaction failed
            failures.update(dict.fromkeys((r.message_key for r in chunk), _error_of(future.state)))
    return failures


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


# Prefect's default runner starts a thread per task submitted and not yet running: a
# thousand for a batch in `record` granularity, all but a few waiting for a connection and
# all contending for the GIL. One thread per pooled connection does the same work faster.
TASK_RUNNER = ThreadPoolTaskRunner(max_workers=db.POOL_SIZE)


@flow(name=INGEST_FLOW, persist_result=False, validate_parameters=True, task_runner=TASK_RUNNER)
def ingest(pipeline: str, batch_id: UUID) -> State:
    logger = get_run_logger()
    settings = get_settings()
    config = load_pipeline(settings.pipelines_file, pipeline)
    run_id = runtime.flow_run.id
    with db.pool(settings.database_url).connection() as conn:
        records = inbox.load_unfinished(conn, pipeline, batch_id, with_data=config.enrich is not None)
    if not records:
        return Completed(message=f"batch {batch_id}: every record already done")
    logger.info("batch %s (%s): processing %d record(s), granularity %s",
                batch_id, pipeline, len(records), config.granularity)
    run = _run_per_record if config.granularity == "record" else _run_per_chunk
    failures = run(records, config, UUID(str(run_id)) if run_id else None)
    with db.pool(settings.database_url).connection() as conn:
        inbox.mark_failed(conn, pipeline, failures, run_id)
    stored = len(records) - len(failures)
    if failures:
        _publish_failures(pipeline, batch_id, records, failures)
        for key, error in list(failures.items())[:20]:
            logger.error("record %s failed: %s", key, error)
        return Failed(message=f"batch {batch_id}: {len(failures)} of {len(records)} record(s) failed, {stored} stored")
    logger.info("batch %s (%s): %d record(s) stored", batch_id, pipeline, stored)
    return Completed(message=f"batch {batch_id}: {stored} record(s) stored")
