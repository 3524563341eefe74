"""Flow `maintenance(pipeline)`: the daily upkeep of a pipeline's inbox (ingest/retention.py).

Its deployment `maintenance/<pipeline>` is scheduled by flows/deployments.py; running it
again, or two at once, is harmless (each deletes what is still there, rows the other
holds are skipped).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed, State

import flows.engine_tuning  # noqa: F401  (before any run starts)
from ingest import db
from ingest.pipelines import MAINTENANCE_FLOW, load_pipeline
from ingest.retention import purge
from ingest.settings import get_settings


@flow(name=MAINTENANCE_FLOW, persist_result=False, validate_parameters=True)
def maintenance(pipeline: str) -> State:
    """Delete `pipeline`'s settled inbox records older than its `inbox_retention_days`, then
    the batches left without records, in small transactions."""
    settings = get_settings()
    config = load_pipeline(settings.pipelines_file, pipeline)
    with db.pool(settings.database_url).connection() as conn:  # autocommit: one transaction per chunk
        purged = purge(conn, pipeline, config.inbox_retention_days)
    message = (f"deleted {purged.records} inbox record(s) and {purged.batches} batch(es) of {pipeline} "
               f"older than {config.inbox_retention_days} days, in {purged.transactions} transaction(s)")
    get_run_logger().info(message)
    return Completed(message=message)
