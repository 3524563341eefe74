"""The `ingest` command line.

Heavy imports (Prefect, the consumers, the flows) happen inside the commands that need
them, so `ingest --help` and `ingest schema` stay fast.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from ingest.settings import get_settings

# Prefect reads its settings from the environment when first imported: derive them from
# INGEST_* before anything imports Prefect.
os.environ.update(get_settings().prefect_environment())

app = typer.Typer(
    help="Event-driven ingestion: RabbitMQ -> Prefect flow runs -> PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PipelineOption = Annotated[
    Optional[list[str]], typer.Option("--pipeline", "-p", help="Only this pipeline (repeatable). Default: all.")
]


def _setup_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _pipelines(names: list[str] | None = None):
    from ingest.pipelines import PipelineConfigError, load_pipelines

    settings = get_settings()
    try:
        pipelines = load_pipelines(settings.pipelines_file)
    except PipelineConfigError as exc:
        raise _fail(str(exc), 2)
    unknown = set(names or ()) - set(pipelines)
    if unknown:
        raise _fail(f"unknown pipeline(s) {', '.join(sorted(unknown))}; known: {', '.join(pipelines)}", 2)
    return [p for name, p in pipelines.items() if not names or name in names]


@app.command()
def schema() -> None:
    """Print the JSON Schema of the record envelope producers publish."""
    import orjson

    from ingest.contract import json_schema

    typer.echo(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode())


@app.command()
def bootstrap(
    skip_prefect: Annotated[bool, typer.Option(help="Only databases, migrations and queues.")] = False,
    prefect_only: Annotated[
        bool, typer.Option(help="Only the work pool and deployments (CI/CD: needs only the Prefect API).")
    ] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the Prefect API to answer.")] = 0,
) -> None:
    """Create databases, run migrations, declare queues, create the work pool and deployments.

    Idempotent: running it again changes nothing.
    """
    from ingest import bootstrap as steps
    from ingest.db import DatabaseUnavailable

    if skip_prefect and prefect_only:
        raise _fail("--skip-prefect and --prefect-only exclude each other", 2)
    _setup_logging()
    settings, pipelines = get_settings(), _pipelines()
    try:
        if not prefect_only:
            steps.prepare_storage(settings, pipelines)
            steps.declare_queues(settings, pipelines)
        if not skip_prefect:
            steps.wait_for_prefect(settings, wait or 5)
            steps.register_deployments(settings, pipelines)
    except (DatabaseUnavailable, TimeoutError, OSError) as exc:
        raise _fail(str(exc))
    except Exception as exc:  # e.g. a queue declared with other arguments
        raise _fail(f"{type(exc).__name__}: {exc}")
    typer.echo("bootstrap complete")


@app.command()
def up() -> None:
    """Bootstrap, then run the Prefect server, the worker and the consumers under supervisord.

    Runs in the foreground; Ctrl-C or SIGTERM stops everything (consumers first).
    """
    from ingest.stack import run_stack

    _setup_logging()
    raise typer.Exit(run_stack(get_settings(), _pipelines()))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ctl(context: typer.Context) -> None:
    """supervisorctl for the stack `ingest up` runs, e.g. `ingest ctl status`, `ingest ctl restart consumer:*`."""
    from ingest.stack import exec_supervisorctl

    exec_supervisorctl(get_settings(), context.args)


@app.command()
def server() -> None:
    """Run the Prefect server on its PostgreSQL database (a program of supervisord.conf)."""
    from ingest.stack import exec_prefect_server

    _setup_logging()
    exec_prefect_server(get_settings())


@app.command()
def worker() -> None:
    """Run a Prefect worker on the process work pool (a program of supervisord.conf)."""
    from ingest.stack import exec_prefect_worker

    _setup_logging()
    exec_prefect_worker(get_settings())


@app.command()
def consumer(pipeline: PipelineOption = None) -> None:
    """Consume the pipelines' queues until SIGTERM (a program of supervisord.conf)."""
    from consumers.consumer import run

    _setup_logging()
    run(get_settings(), _pipelines(pipeline))


@app.command()
def publish(
    file: Annotated[Optional[Path], typer.Argument(help="JSONL file, one record envelope per line; '-' or none: stdin.")] = None,
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="Routing key (pipeline name).")] = "records",
    concurrency: Annotated[int, typer.Option(help="Messages awaiting their confirm at once.")] = 200,
    message_id_field: Annotated[
        Optional[str], typer.Option(help="Use this field of each line's JSON as the AMQP message_id.")
    ] = None,
) -> None:
    """Publish JSONL records with publisher confirms and mandatory routing.

    Lines are sent as they are (bad ones are dead-lettered by the consumers, not here).
    Exits non-zero if any line was not confirmed.
    """
    from ingest.publisher import publish_lines

    _setup_logging()
    _pipelines([pipeline])
    stream = sys.stdin.buffer if file is None or str(file) == "-" else None
    if stream is None and not file.exists():
        raise _fail(f"{file} does not exist", 2)
    published, failed = publish_lines(get_settings(), file if stream is None else None, pipeline, concurrency, message_id_field)
    typer.echo(f"published {published}, failed {failed}")
    if failed:
        raise typer.Exit(1)


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    from ingest.backfill import as_utc

    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        raise _fail(f"--{name} {value!r} is not an ISO 8601 date or time (e.g. 2024-05-01 or 2024-05-01T06:00:00Z)", 2)


@app.command("backfill")
def backfill_command(
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
    from datetime import timezone

    from ingest import backfill_cli
    from ingest.backfill import Window, previous_day

    if mode not in ("failed", "all") or by not in ("occurred", "received"):
        raise _fail("--mode is `failed` or `all`; --by is `occurred` or `received`", 2)
    config = _pipelines([pipeline])[0]
    default_start, default_end = previous_day(datetime.now(timezone.utc))
    try:
        window = Window(_when(start, "start") or default_start, _when(end, "end") or default_end, by)
    except ValueError as exc:
        raise _fail(str(exc), 2)
    settings = get_settings()
    if dry_run:
        backfill_cli.dry_run(settings, config, window, mode)
        return
    try:
        run_id, name = backfill_cli.start(config, window, mode, by)
    except Exception as exc:
        raise _fail(f"could not create the backfill run ({type(exc).__name__}: {exc}); did `ingest bootstrap` run?")
    typer.echo(f"backfill run {name} ({run_id}) created: {config.name} {window}, mode {mode}")
    typer.echo(f"  {settings.prefect_api_url.removesuffix('/api')}/runs/flow-run/{run_id}")
    if wait and not backfill_cli.wait(settings, run_id):
        raise typer.Exit(1)


@app.command()
def status(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output (stable shape).")] = False,
    pipeline: PipelineOption = None,
    hours: Annotated[float, typer.Option(help="Count flow runs scheduled in the last N hours.")] = 24,
) -> None:
    """Per pipeline: queue and DLQ depth, inbox, batches, recent flow runs, sink rows."""
    import asyncio

    import orjson

    from ingest.status import collect, render

    settings, pipelines = get_settings(), _pipelines(pipeline)  # exits 2 on an unknown pipeline
    try:
        snapshot = asyncio.run(collect(settings, pipelines, hours))
    except Exception as exc:
        raise _fail(f"{type(exc).__name__}: {exc}")
    typer.echo(orjson.dumps(snapshot, option=orjson.OPT_INDENT_2).decode() if json_output else render(snapshot))


@app.command()
def health(
    timeout: Annotated[float, typer.Option(help="Seconds each service may take to answer.")] = 5,
) -> None:
    """Check that RabbitMQ, PostgreSQL and the Prefect API answer; exit 1 if any does not."""
    from ingest.health import check

    results = check(get_settings(), timeout)
    for name, error, seconds in results:
        typer.echo(f"{name:<12} {'ok' if error is None else 'FAILED: ' + error} ({seconds * 1000:.0f} ms)")
    if any(error is not None for _, error, _ in results):
        raise typer.Exit(1)


def _register_replay() -> None:
    # Its module imports only typer at the top, like this one: `ingest --help` stays fast.
    from ingest.replay import replay_app

    app.add_typer(replay_app, name="replay")


_register_replay()

if __name__ == "__main__":
    app()
