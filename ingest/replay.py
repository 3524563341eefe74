"""`ingest replay`: process again what failed, in bulk and idempotently.

- `ingest replay runs`: retry the flow runs a filter selects, as the UI's Retry does
  (ingest/rerun.py);
- `ingest replay dlq`: re-publish a pipeline's dead letters (ingest/redrive.py, which also
  explains which message id a re-driven message gets).

Both are safe to run twice, both have `--dry-run`, and both exit non-zero when something
failed (2 for a usage error: unknown pipeline, deployment or reason).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from ingest.settings import get_settings

log = logging.getLogger(__name__)

replay_app = typer.Typer(
    help="Process again what failed: flow runs in bulk (runs), dead letters (dlq).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_STATES = ["FAILED", "CRASHED"]


def _timestamp(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date-time, e.g. 2024-05-01T12:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _replay_id() -> str:
    """Names one invocation: in the retried runs' state message, in each re-driven message's headers."""
    return uuid.uuid4().hex[:12]


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """Yield `update(done, total, note)`: a bar on stderr if it is a terminal, else a log line every 5 s."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        last = [time.monotonic()]  # short work needs no progress lines: the summary follows

        def log_line(done: int, total: int, note: str) -> None:
            if time.monotonic() - last[0] >= 5:
                last[0] = time.monotonic()
                log.info("%s: %d of %d%s", label, done, total, f" ({note})" if note else "")

        yield log_line
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=None, note="")
        yield lambda done, total, note: progress.update(task, completed=done, total=total, note=note)


# --- ingest replay runs -----------------------------------------------------------------


def _state_types(values: list[str]) -> list:
    from ingest.rerun import RETRYABLE, StateType

    names = {s.value: s for s in RETRYABLE}
    unknown = [v for v in values if v.upper() not in names]
    if unknown:
        raise typer.BadParameter(
            f"{', '.join(unknown)}: only runs that are over can be retried: {', '.join(names)}", param_hint="--state"
        )
    return list(dict.fromkeys(StateType(v.upper()) for v in values))


@replay_app.command()
def runs(
    pipeline: Annotated[
        Optional[list[str]], typer.Option("--pipeline", "-p", help="Runs of deployment ingest/<PIPELINE> (repeatable).")
    ] = None,
    deployment: Annotated[
        Optional[list[str]], typer.Option("--deployment", "-d", help="Runs of this deployment, FLOW/NAME (repeatable).")
    ] = None,
    state: Annotated[
        Optional[list[str]],
        typer.Option("--state", "-s", help="State type of the runs to retry (repeatable, any case). "
                     "Default: FAILED and CRASHED; COMPLETED and CANCELLED runs can be retried too."),
    ] = None,
    since: Annotated[
        Optional[datetime],
        typer.Option(parser=_timestamp, metavar="DATETIME",
                     help="Only runs expected to start at or after this ISO 8601 time (no offset: UTC)."),
    ] = None,
    until: Annotated[
        Optional[datetime],
        typer.Option(parser=_timestamp, metavar="DATETIME", help="Only runs expected to start at or before this time."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Retry at most this many runs, the oldest first.")] = 1000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs that would be retried; change nothing.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the retried runs are over; fail unless all completed.")] = False,
    timeout: Annotated[float, typer.Option(min=1, help="With --wait: seconds to wait at most.")] = 1800,
) -> None:
    """Retry flow runs in bulk, as the UI's Retry does: the same run is scheduled again.

    A retried `ingest` run re-reads its batch and processes only its records not done yet.
    Safe to run twice: the second time the runs are no longer failed, nothing is selected.
    """
    from ingest.cli import _fail, _pipelines, _setup_logging

    _setup_logging()
    if not pipeline and not deployment:
        raise _fail("say which runs: --pipeline P or --deployment FLOW/NAME (both repeatable)", 2)
    names = [p.deployment for p in _pipelines(pipeline)] if pipeline else []
    for name in deployment or ():
        if name.count("/") != 1 or not all(name.split("/")):
            raise _fail(f"--deployment {name!r}: expected FLOW/NAME, e.g. ingest/records", 2)
        names.append(name)
    states = _state_types(state or DEFAULT_STATES)

    from ingest.rerun import PrefectUnavailable, UnknownDeployment

    try:
        code = asyncio.run(_retry_runs(list(dict.fromkeys(names)), states, since, until, limit, dry_run, wait, timeout))
    except UnknownDeployment as exc:
        raise _fail(str(exc), 2)
    except PrefectUnavailable as exc:
        raise _fail(str(exc))
    raise typer.Exit(code)


async def _retry_runs(names, states, since, until, limit, dry_run, wait, timeout) -> int:
    from prefect.client.orchestration import get_client

    from ingest import rerun

    async with get_client() as client:
        await rerun.check_api(client)
        selection = await rerun.select_runs(
            client, await rerun.resolve_deployments(client, names), states, since, until, limit
        )
        wanted = ", ".join(s.value for s in states)
        typer.echo(f"selected {len(selection.runs)} of {selection.matching} {wanted} flow run(s) of {', '.join(names)}"
                   + (f" (--limit {limit}: run again for the rest)" if selection.matching > len(selection.runs) else ""))
        if dry_run:
            for run in selection.runs:
                typer.echo(_run_line("would retry", run, selection.deployments))
            typer.echo(f"dry run: would retry {len(selection.runs)} of {len(selection.runs)} selected runs; nothing changed")
            return 0
        note = f"Retried by ingest replay runs {_replay_id()}"
        outcomes = []
        for run in selection.runs:
            outcome = await rerun.retry_run(client, run, states, note)
            outcomes.append(outcome)
            typer.echo(_run_line(outcome.status, outcome.run, selection.deployments, outcome.detail))
        retried = [o.run.id for o in outcomes if o.status == "retried"]
        failed = sum(1 for o in outcomes if o.status == "failed")
        skipped = len(outcomes) - len(retried) - failed
        typer.echo(f"retried {len(retried)} of {len(outcomes)} selected runs, {failed} failed"
                   + (f", {skipped} skipped (no longer {wanted})" if skipped else ""))
        if wait and retried:
            return 1 if failed or not await _wait(client, retried, timeout, selection.deployments) else 0
        return 1 if failed else 0


async def _wait(client, ids, timeout: float, deployments: dict) -> bool:
    """Wait for the retried runs to be over; True if every one completed."""
    from ingest import rerun

    with _progress("waiting for the retried runs") as update:
        runs = await rerun.wait_final(client, ids, timeout, update)
    for run in runs:
        typer.echo(_run_line("final" if run.state.is_final() else "waiting", run, deployments, f"run_count {run.run_count}"))
    completed = sum(1 for r in runs if r.state.is_completed())
    unfinished = sum(1 for r in runs if not r.state.is_final())
    typer.echo(f"waited for {len(ids)} run(s): {completed} completed, {len(ids) - completed - unfinished} not completed"
               + (f", {unfinished} not over after {timeout:.0f}s" if unfinished else ""))
    return completed == len(ids)


def _run_line(status: str, run, deployments: dict, detail: str = "") -> str:
    state = run.state.name if run.state else "-"
    if status == "retried":
        state += " -> Scheduled"
    deployment = deployments.get(run.deployment_id, str(run.deployment_id))
    return f"{status:<11} {run.name}  {run.id}  {state}  {deployment}" + (f"  ({detail})" if detail else "")


# --- ingest replay dlq ------------------------------------------------------------------


@replay_app.command()
def dlq(
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="Re-drive this pipeline's DLQ to its queue.")],
    reason: Annotated[
        Optional[list[str]],
        typer.Option("--reason", "-r", help="Only dead letters of this reason (repeatable): x-error-reason, "
                     "or delivery_limit. Default: all."),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Re-publish at most this many. Default: all.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count the dead letters by reason, show sample errors; change nothing.")
    ] = False,
) -> None:
    """Re-publish dead letters to exchange `ingest` with their original body, properties and message id.

    A dead letter leaves the DLQ only once the broker confirmed its new copy.
    The inbox dedups on the message id: re-driving twice stores nothing twice.
    Messages still invalid are dead-lettered again, once: a run reads only what the DLQ held when it started.
    """
    from ingest.cli import _fail, _pipelines, _setup_logging
    from ingest.redrive import BROKER_ERRORS, REASONS, DlqUnavailable, redrive

    _setup_logging()
    (config,) = _pipelines([pipeline])
    unknown = sorted(set(reason or ()) - set(REASONS))
    if unknown:
        raise _fail(f"unknown reason(s) {', '.join(unknown)}; known: {', '.join(REASONS)}", 2)
    replay_id = _replay_id()
    settings = get_settings()
    try:
        with _progress(f"replay {replay_id}: {config.dlq}") as update:
            report = asyncio.run(redrive(settings, config, reason or [], limit, dry_run, replay_id, update))
    except DlqUnavailable as exc:
        raise _fail(str(exc))
    except BROKER_ERRORS as exc:
        raise _fail(f"RabbitMQ unreachable: {type(exc).__name__}: {exc}")
    _print_redrive(report, config, dry_run)
    raise typer.Exit(1 if report.error or sum(report.failed.values()) else 0)


def _print_redrive(report, config, dry_run: bool) -> None:
    republished, kept, failed = (sum(c.values()) for c in (report.republished, report.kept, report.failed))
    typer.echo(f"replay {report.replay_id}: {config.dlq} held {report.depth} message(s)"
               + ("; dry run, nothing changes" if dry_run else f"; re-driving to exchange ingest, routing key {config.name}"))
    for reason in sorted({*report.republished, *report.kept, *report.failed}):
        verb = "to re-publish" if dry_run else "re-published"
        typer.echo(f"  {reason}: {report.republished[reason]} {verb}, {report.kept[reason]} kept"
                   + (f", {report.failed[reason]} failed" if report.failed[reason] else ""))
        for message_id, error in report.samples.get(reason, []) if dry_run else []:
            typer.echo(f"      {message_id}: {error[:300]}")
    if report.stopped:
        typer.echo(f"stopped early: {report.stopped}")
    if report.error:
        typer.secho(f"error: {report.error}", fg=typer.colors.RED, err=True)
    if not report.consumers and republished:
        typer.secho(f"warning: no consumer on queue {config.queue}: re-published messages wait there until one starts",
                    fg=typer.colors.YELLOW, err=True)
    if dry_run:
        typer.echo(f"dry run: would re-publish {republished}, keep {kept} in the DLQ; nothing changed")
    else:
        typer.echo(f"re-published {republished}, kept {kept} in the DLQ, failed {failed}")

