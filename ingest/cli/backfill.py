"""`ingest backfill`: a run of the pipeline's backfill deployment (flows/backfill.py), shown in
the UI with its parameters, optionally followed to the end; or, with --dry-run, what it
would reprocess (ingest/windows.py counts it)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ingest.cli.common import chosen_pipelines, fail
from ingest.pipelines import Pipeline
from ingest.settings import Settings, get_settings
from ingest.times import parse_timestamp

if TYPE_CHECKING:
    from ingest.windows import Mode, TimeField, Window

POLL_SECONDS = 2.0


def backfill(
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="The pipeline to reprocess.")],
    start: Annotated[Optional[str], typer.Option(help="Window start (inclusive); default: yesterday 00:00 UTC.")] = None,
    end: Annotated[Optional[str], typer.Option(help="Window end (exclusive); default: today 00:00 UTC.")] = None,
    mode: Annotated[str, typer.Option(help="`failed`: failed or stuck records; `all`: every record.")] = "failed",
    by: Annotated[str, typer.Option(help="`occurred` (occurred_at) or `received` (arrival time).")] = "occurred",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the run to its end, with progress.")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be reprocessed.")] = False,
) -> None:
    """Reprocess a window of records through a run of deployment backfill/<pipeline>.

    The run shows in the Prefect UI with its parameters. It regroups the records into
    batches and creates ingest runs for them; retrying it creates nothing new.
    """
    from ingest.windows import Window, previous_day, retention_note

    if mode not in ("failed", "all") or by not in ("occurred", "received"):
        raise fail("--mode is `failed` or `all`; --by is `occurred` or `received`", 2)
    config = chosen_pipelines([pipeline])[0]
    default_start, default_end = previous_day(datetime.now(timezone.utc))
    try:
        window = Window(_when(start, "start") or default_start, _when(end, "end") or default_end, by)
    except ValueError as exc:
        raise fail(str(exc), 2)
    settings = get_settings()
    note = retention_note(window, config.inbox_retention_days, datetime.now(timezone.utc))
    if note:
        typer.echo(f"warning: {note}", err=True)
    if dry_run:
        _dry_run(settings, config, window, mode)
        return
    try:
        run_id, name = _start(config, window, mode, by)
    except Exception as exc:
        raise fail(f"could not create the backfill run ({type(exc).__name__}: {exc}); did `ingest bootstrap` run?")
    typer.echo(f"backfill run {name} ({run_id}) created: {config.name} {window}, mode {mode}")
    typer.echo(f"  {settings.prefect_api_url.removesuffix('/api')}/runs/flow-run/{run_id}")
    if wait and not _follow(settings, run_id):
        raise typer.Exit(1)


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        raise fail(f"--{name} {value!r} is not an ISO 8601 date or time (e.g. 2024-05-01 or 2024-05-01T06:00:00Z)", 2)


def _dry_run(settings: Settings, pipeline: Pipeline, window: Window, mode: Mode) -> None:
    from ingest import db
    from ingest.windows import count_candidates

    with db.connect(settings.database_url) as conn:
        counts = count_candidates(conn, pipeline.name, window, mode, pipeline.stuck_after_seconds)
    total = sum(counts.values())
    batches = -(-total // pipeline.batch.max_records)
    detail = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
    typer.echo(f"dry run: a backfill of {pipeline.name} {window}, mode {mode}, would reprocess "
               f"{total} record(s) ({detail}) in {batches} batch(es) of up to {pipeline.batch.max_records}, "
               f"{pipeline.backfill_concurrency} ingest run(s) at a time. Nothing was changed.")


def _start(pipeline: Pipeline, window: Window, mode: Mode, by: TimeField) -> tuple[str, str]:
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


def _follow(settings: Settings, run_id: str) -> bool:
    """Follow the run with progress until it is final; True if it completed."""
    from prefect import get_client

    from ingest import db
    from ingest.waiting import poll

    last = [None]

    def read(client):
        state = client.read_flow_run(run_id).state
        with db.connect(settings.database_url) as conn:
            batches, done = conn.execute(
                """SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (
                       SELECT 1 FROM inbox i WHERE i.batch_id = b.batch_id AND i.status <> 'done'))
                   FROM batches b WHERE origin = %s""",
                (f"backfill:{run_id}",),
            ).fetchone()
        line = f"{state.name}: {done}/{batches} batch(es) fully done"
        if line != last[0]:
            typer.echo(f"{datetime.now():%H:%M:%S} {line}", err=True)
            last[0] = line
        return state

    with get_client(sync_client=True) as client:
        state = poll(lambda: read(client), until=lambda s: s.is_final(), interval=POLL_SECONDS,
                     what=f"backfill run {run_id} final")
    typer.echo(f"backfill run {run_id} ended {state.name}: {state.message or ''}".rstrip(": "))
    return state.is_completed()
