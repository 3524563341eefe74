"""`ingest backfill`: a run of the pipeline's backfill deployment, shown in the UI with its
parameters, optionally followed to the end; or, with --dry-run, what it would reprocess."""

from __future__ import annotations

import time
from datetime import datetime

import typer

from ingest import db
from ingest.backfill import Mode, TimeField, Window, count_candidates
from ingest.pipelines import Pipeline
from ingest.settings import Settings

POLL_SECONDS = 2.0


def dry_run(settings: Settings, pipeline: Pipeline, window: Window, mode: Mode) -> None:
    with db.connect(settings.database_url) as conn:
        counts = count_candidates(conn, pipeline.name, window, mode, pipeline.stuck_after_seconds)
    total = sum(counts.values())
    batches = -(-total // pipeline.batch.max_records)
    detail = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
    typer.echo(f"dry run: a backfill of {pipeline.name} {window}, mode {mode}, would reprocess "
               f"{total} record(s) ({detail}) in {batches} batch(es) of up to {pipeline.batch.max_records}, "
               f"{pipeline.backfill_concurrency} ingest run(s) at a time. Nothing was changed.")


def start(pipeline: Pipeline, window: Window, mode: Mode, by: TimeField) -> tuple[str, str]:
    """Create the backfill run; return its id and name."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(pipeline.backfill_deployment)
        run = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"pipeline": pipeline.name, "start": window.start.isoformat(),
                        "end": window.end.isoformat(), "mode": mode, "by": by},
        )
    return str(run.id), run.name


def wait(settings: Settings, run_id: str) -> bool:
    """Follow the run with progress until it is final; True if it completed."""
    from prefect import get_client

    last = None
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            with db.connect(settings.database_url) as conn:
                batches, done = conn.execute(
                    """SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (
                           SELECT 1 FROM inbox i WHERE i.batch_id = b.batch_id AND i.status <> 'done'))
                       FROM batches b WHERE origin = %s""",
                    (f"backfill:{run_id}",),
                ).fetchone()
            line = f"{state.name}: {done}/{batches} batch(es) fully done"
            if line != last:
                typer.echo(f"{datetime.now():%H:%M:%S} {line}", err=True)
                last = line
            if state.is_final():
                typer.echo(f"backfill run {run_id} ended {state.name}: {state.message or ''}".rstrip(": "))
                return state.is_completed()
            time.sleep(POLL_SECONDS)
