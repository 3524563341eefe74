"""`ingest replay runs`: retry the flow runs a filter selects, in bulk and idempotently, as the
UI's Retry does (flows/retry_runs.py selects and retries them).

Safe to run twice, has `--dry-run`, and exits non-zero when something failed (2 for a
usage error: unknown pipeline or deployment). Its sibling `ingest replay dlq` is
ingest/cli/dlq.py.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Optional

import typer

from ingest.cli.common import chosen_pipelines, fail, progress, replay_id, setup_logging
from ingest.times import parse_timestamp

DEFAULT_STATES = ["FAILED", "CRASHED"]


def _timestamp(value: str) -> datetime:
    try:
        return parse_timestamp(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date-time, e.g. 2024-05-01T12:00:00Z") from None


def _state_types(values: list[str]) -> list:
    from flows.retry_runs import RETRYABLE, StateType

    names = {s.value: s for s in RETRYABLE}
    unknown = [v for v in values if v.upper() not in names]
    if unknown:
        raise typer.BadParameter(
            f"{', '.join(unknown)}: only runs that are over can be retried: {', '.join(names)}", param_hint="--state"
        )
    return list(dict.fromkeys(StateType(v.upper()) for v in values))


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
    setup_logging()
    if not pipeline and not deployment:
        raise fail("say which runs: --pipeline P or --deployment FLOW/NAME (both repeatable)", 2)
    names = [p.deployment for p in chosen_pipelines(pipeline)] if pipeline else []
    for name in deployment or ():
        if name.count("/") != 1 or not all(name.split("/")):
            raise fail(f"--deployment {name!r}: expected FLOW/NAME, e.g. ingest/records", 2)
        names.append(name)
    states = _state_types(state or DEFAULT_STATES)

    from flows.retry_runs import PrefectUnavailable, UnknownDeployment

    try:
        code = asyncio.run(_retry_runs(list(dict.fromkeys(names)), states, since, until, limit, dry_run, wait, timeout))
    except UnknownDeployment as exc:
        raise fail(str(exc), 2)
    except PrefectUnavailable as exc:
        raise fail(str(exc))
    raise typer.Exit(code)


async def _retry_runs(names, states, since, until, limit, dry_run, wait, timeout) -> int:
    from prefect.client.orchestration import get_client

    from flows import retry_runs

    async with get_client() as client:
        await retry_runs.check_api(client)
        selection = await retry_runs.select_runs(
            client, await retry_runs.resolve_deployments(client, names), states, since, until, limit
        )
        wanted = ", ".join(s.value for s in states)
        typer.echo(f"selected {len(selection.runs)} of {selection.matching} {wanted} flow run(s) of {', '.join(names)}"
                   + (f" (--limit {limit}: run again for the rest)" if selection.matching > len(selection.runs) else ""))
        if dry_run:
            for run in selection.runs:
                typer.echo(_run_line("would retry", run, selection.deployments))
            typer.echo(f"dry run: would retry {len(selection.runs)} of {len(selection.runs)} selected runs; nothing changed")
            return 0
        note = f"Retried by ingest replay runs {replay_id()}"
        outcomes = []
        for run in selection.runs:
            outcome = await retry_runs.retry_run(client, run, states, note)
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
    from flows import retry_runs

    with progress("waiting for the retried runs") as update:
        runs = await retry_runs.wait_final(client, ids, timeout, update)
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
