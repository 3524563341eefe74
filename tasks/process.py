"""The Prefect tasks a batch runs: one per record, or one per chunk of records.

Both apply the same steps (normalize, optional enrich, store). A record a step rejects is
reported back as failed; an unexpected error (database down, a bug) fails the task run,
which Prefect retries as configured.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE

from ingest import db
from ingest.inbox import InboxRecord
from ingest.pipelines import Pipeline
from ingest.settings import get_settings
from tasks import RecordRejected
from tasks.enrich import enrich
from tasks.normalize import normalize
from tasks.store import store

# Enrichment calls of one chunk in flight at once.
ENRICH_CONCURRENCY = 8


def retry_unless_rejected(task, task_run, state) -> bool:
    """Retrying cannot change a rejection; only unexpected errors are retried."""
    try:
        state.result()
    except RecordRejected:
        return False
    except Exception:
        return True
    return False


def _prepare(record: InboxRecord, pipeline: Pipeline) -> tuple[InboxRecord, dict[str, Any] | None]:
    record = normalize(record)
    return record, (enrich(record, pipeline.enrich) if pipeline.enrich else None)


# No cache policy: hashing every record's inputs would cost more than the work itself.
@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_unless_rejected,
      task_run_name="{record.source}/{record.id}")
def process_record(record: InboxRecord, pipeline: Pipeline, flow_run_id: UUID) -> None:
    """One record: its task run carries the record key, so the UI shows each record's outcome."""
    prepared, enrichment = _prepare(record, pipeline)
    with db.pool(get_settings().database_url).connection() as conn:
        store(conn, pipeline.name, pipeline.sink_table, [prepared], [enrichment], flow_run_id)


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_unless_rejected)
def process_chunk(records: list[InboxRecord], pipeline: Pipeline, flow_run_id: UUID) -> dict[str, str]:
    """Many records in one task run and one transaction; returns the rejected ones (key -> error)."""
    rejected: dict[str, str] = {}
    good: list[tuple[InboxRecord, dict[str, Any] | None]] = []

    def attempt(record: InboxRecord):
        try:
            return _prepare(record, pipeline)
        except RecordRejected as exc:
            return exc

    workers = ENRICH_CONCURRENCY if pipeline.enrich else 1
    with ThreadPoolExecutor(workers) as pool:
        for record, outcome in zip(records, pool.map(attempt, records)):
            if isinstance(outcome, RecordRejected):
                rejected[record.message_key] = str(outcome)
            else:
                good.append(outcome)
    with db.pool(get_settings().database_url).connection() as conn:
        store(conn, pipeline.name, pipeline.sink_table, [r for r, _ in good], [e for _, e in good], flow_run_id)
    return rejected
