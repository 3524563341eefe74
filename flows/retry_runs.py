"""Selecting flow runs by deployment, state and time, and retrying them as the UI's Retry
does (`ingest replay runs`, ingest/cli/runs.py).

A retry puts the same flow run back to Scheduled (force=True, as `prefect flow-run retry`
does); the worker runs it again and its run_count goes up. The `ingest` flow re-reads its
batch from the inbox, so a retried run processes only its records that are not done.

Import this module after `ingest.cli.main` (the command line does): Prefect reads its
settings from the environment that `ingest.cli.main` derives from INGEST_* when first imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterExpectedStartTime, FlowRunFilterId,
    FlowRunFilterState, FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Scheduled

from ingest.waiting import TimedOut, apoll

# What Prefect itself lets `prefect flow-run retry` retry: a run that is not over must not
# be forced back to Scheduled, or it would run twice at once.
RETRYABLE = (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED)
# The API's largest page (PREFECT_SERVER_API_DEFAULT_LIMIT).
PAGE = 200


class PrefectUnavailable(Exception):
    pass


class UnknownDeployment(Exception):
    pass


@dataclass(frozen=True)
class Selection:
    runs: list[FlowRun]
    matching: int  # runs matching the filter; more than len(runs) when --limit cut them
    deployments: dict[UUID, str]  # id -> "flow/name"


@dataclass(frozen=True)
class Outcome:
    run: FlowRun
    status: str  # "retried", "skipped" (no longer in a selected state) or "failed"
    detail: str


async def check_api(client: PrefectClient) -> None:
    """Fail at once with the API's URL, rather than after the client's retries of every call."""
    if (error := await client.api_healthcheck()) is not None:
        raise PrefectUnavailable(f"Prefect API {client.api_url} unreachable: {type(error).__name__}: {error}")


async def resolve_deployments(client: PrefectClient, names: list[str]) -> dict[UUID, str]:
    deployments = {}
    for name in names:
        try:
            deployment = await client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise UnknownDeployment(f"no deployment {name!r} in Prefect (ingest bootstrap creates them)") from None
        deployments[deployment.id] = name
    return deployments


def _filter(states: list[StateType], since: datetime | None, until: datetime | None) -> FlowRunFilter:
    return FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)),
        expected_start_time=FlowRunFilterExpectedStartTime(after_=since, before_=until),
    )


async def select_runs(
    client: PrefectClient, deployments: dict[UUID, str], states: list[StateType],
    since: datetime | None, until: datetime | None, limit: int,
) -> Selection:
    """The oldest `limit` runs of these deployments in these states, by expected start time."""
    deployment_filter = DeploymentFilter(id=DeploymentFilterId(any_=list(deployments)))
    matching = await client.count_flow_runs(deployment_filter=deployment_filter, flow_run_filter=_filter(states, since, until))
    # Keyset pagination on expected_start_time (inclusive, so ties at a page edge come
    # again and are skipped by id): offsets would shift as runs change state meanwhile.
    runs: dict[UUID, FlowRun] = {}
    cursor = since
    while len(runs) < min(limit, matching):
        page = await client.read_flow_runs(
            deployment_filter=deployment_filter, flow_run_filter=_filter(states, cursor, until),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=PAGE,
        )
        new = [r for r in page if r.id not in runs]
        runs.update((r.id, r) for r in new[: limit - len(runs)])
        if len(page) < PAGE or not new:  # the last page (or a page of one instant, all seen)
            break
        cursor = page[-1].expected_start_time
    return Selection(list(runs.values()), matching, deployments)


async def retry_run(client: PrefectClient, run: FlowRun, states: list[StateType], note: str) -> Outcome:
    # Read it again: if someone retried it since the selection it may be running, and
    # forcing a running run back to Scheduled would run it twice at once.
    current = await client.read_flow_run(run.id)
    if current.state is None or current.state.type not in states:
        return Outcome(current, "skipped", f"now {current.state.name if current.state else 'without a state'}")
    result = await client.set_flow_run_state(run.id, Scheduled(message=note), force=True)
    if result.status != SetStateStatus.ACCEPT:
        reason = getattr(result.details, "reason", None) or result.status.value
        return Outcome(current, "failed", f"Prefect refused the retry: {reason}")
    return Outcome(current, "retried", "")


async def read_runs(client: PrefectClient, ids: list[UUID]) -> list[FlowRun]:
    runs = []
    for start in range(0, len(ids), PAGE):
        chunk = ids[start : start + PAGE]
        runs += await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=PAGE)
    return runs


async def wait_final(
    client: PrefectClient, ids: list[UUID], timeout: float, on_progress: Callable[[int, int, str], None],
    poll_seconds: float = 2.0,
) -> list[FlowRun]:
    """Poll until every run is in a final state or `timeout` passed; return their last reading."""

    async def read() -> list[FlowRun]:
        runs = await read_runs(client, ids)
        final = [r for r in runs if r.state and r.state.is_final()]
        completed = sum(1 for r in final if r.state.is_completed())
        on_progress(len(final), len(ids), f"{completed} completed, {len(final) - completed} not")
        return runs

    def all_final(runs: list[FlowRun]) -> bool:
        return sum(1 for r in runs if r.state and r.state.is_final()) == len(ids)

    try:
        return await apoll(read, until=all_final, timeout=timeout, interval=poll_seconds, what="retried runs final")
    except TimedOut as exc:
        return exc.last
