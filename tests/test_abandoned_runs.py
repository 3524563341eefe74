"""Rescuing runs a dead worker left Pending, against the real Prefect server of the stack,
on a deployment whose work pool no worker polls (its runs stay as the test leaves them).

The rescue read the run's state, then forced it to Scheduled: a run whose worker had only
been slow and started it in between was sent back, to run a second time. And it looked at
the first 200 Pending runs only."""

from __future__ import annotations

import asyncio
import uuid

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterStateType
from prefect.client.schemas.filters import FlowRunFilterState
from prefect.states import Pending, Running

from consumers.submit import ABANDONED_PAGE, Submitter
from ingest.pipelines import Pipeline
from ingest.settings import Settings


async def idle_deployment(client: PrefectClient, name: str):
    pool = f"idle-{name}"
    await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    flow = await client.read_flow_by_name("ingest")
    return await client.create_deployment(flow_id=flow.id, name=name, work_pool_name=pool)


def rescuer(client, name: str) -> Submitter:
    """A consumer's rescue of abandoned runs, for runs Pending longer than a millisecond."""
    submitter = Submitter(None, Settings(abandoned_run_seconds=0.001), {name: Pipeline(name=name)})
    submitter.client = client
    return submitter


class SlowWorker:
    """The rescuer's Prefect client, with the run's worker (slow, not dead) starting it just
    before the rescuer's first change of state."""

    def __init__(self, client: PrefectClient):
        self.client = client
        self.started = False

    def __getattr__(self, name):
        return getattr(self.client, name)

    async def set_flow_run_state(self, flow_run_id, state, force: bool = False):
        if not self.started:
            self.started = True
            started = await self.client.set_flow_run_state(flow_run_id, Running())  # as the flow-run process does
            assert started.state.is_running(), started
        return await self.client.set_flow_run_state(flow_run_id, state, force=force)


def test_a_run_started_meanwhile_is_left_running_and_an_abandoned_one_is_scheduled(stack):
    name = f"abandon_{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple:
        async with PrefectClient(stack.api_url) as client:
            deployment = await idle_deployment(client, name)
            started, abandoned = [await client.create_flow_run_from_deployment(deployment, state=Pending())
                                  for _ in range(2)]
            await rescuer(SlowWorker(client), name)._reschedule(await client.read_flow_run(started.id))
            await rescuer(client, name)._reschedule(await client.read_flow_run(abandoned.id))
            return await client.read_flow_run(started.id), await client.read_flow_run(abandoned.id)

    started, abandoned = asyncio.run(scenario())
    assert started.state.is_running(), started.state
    assert abandoned.state.is_scheduled(), abandoned.state
    assert "its worker is gone; scheduled again" in abandoned.state.message


def test_every_abandoned_run_is_found_however_many(stack):
    name = f"abandon_{uuid.uuid4().hex[:8]}"
    count = ABANDONED_PAGE + 5

    async def scenario() -> tuple[set, set, int]:
        async with PrefectClient(stack.api_url) as client:
            deployment = await idle_deployment(client, name)
            created = set()
            for _ in range(0, count, 25):  # a few at a time: the server shares two cores
                runs = await asyncio.gather(*(client.create_flow_run_from_deployment(deployment, state=Pending())
                                              for _ in range(min(25, count - len(created)))))
                created |= {run.id for run in runs}
            submitter = rescuer(client, name)
            found = {run.id for run in await submitter._abandoned_runs()}
            await submitter.rescue()
            scheduled = await client.count_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))))
            return created, found, scheduled

    created, found, scheduled = asyncio.run(scenario())
    assert len(created) == count
    assert found == created
    assert scheduled == count
