"""`ingest replay dlq`: re-publish a pipeline's dead letters to its queue, in bulk and
idempotently (consumers/redrive.py does it, and explains which message id a re-driven
message gets).

Safe to run twice, has `--dry-run`, and exits non-zero when something failed (2 for a
usage error: unknown pipeline or reason). Its sibling `ingest replay runs` is ingest/cli/runs.py.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Optional

import typer

from ingest.cli.common import chosen_pipelines, fail, progress, replay_id, setup_logging
from ingest.settings import get_settings


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
    from consumers.redrive import BROKER_ERRORS, REASONS, DlqUnavailable, redrive

    setup_logging()
    (config,) = chosen_pipelines([pipeline])
    unknown = sorted(set(reason or ()) - set(REASONS))
    if unknown:
        raise fail(f"unknown reason(s) {', '.join(unknown)}; known: {', '.join(REASONS)}", 2)
    this_replay = replay_id()
    settings = get_settings()
    try:
        with progress(f"replay {this_replay}: {config.dlq}") as update:
            report = asyncio.run(redrive(settings, config, reason or [], limit, dry_run, this_replay, update))
    except DlqUnavailable as exc:
        raise fail(str(exc))
    except BROKER_ERRORS as exc:
        raise fail(f"RabbitMQ unreachable: {type(exc).__name__}: {exc}")
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

