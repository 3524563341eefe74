"""What our flow-run processes change in Prefect's flow engine (flows/engine_tuning.py says why)."""

import asyncio
import logging
import threading
import time
from types import SimpleNamespace
from uuid import uuid4

import pytest
from prefect import _flow_run_suspension, flow_engine
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import related
from prefect.events import worker as events_worker

import flows.ingest  # noqa: F401  (importing the flows tunes the engine)
from flows import engine_tuning


def test_the_engine_still_looks_the_watch_up_by_the_name_we_replace():
    # A Prefect upgrade that renamed or moved it would leave our replacement unused.
    setup = flow_engine.BaseFlowRunEngine.setup_flow_run_suspension_request.__wrapped__
    assert "observe_flow_run_suspension" in setup.__code__.co_names


def test_no_watch_thread_is_started():
    assert flow_engine.observe_flow_run_suspension is not _flow_run_suspension.observe_flow_run_suspension
    before = threading.active_count()
    with flow_engine.observe_flow_run_suspension(None, _flow_run_suspension.FlowRunSuspensionRequest()):
        assert threading.active_count() == before


def test_the_engine_still_looks_the_heartbeats_up_by_the_name_we_replace():
    assert "_send_heartbeats" in flow_engine.FlowRunEngine.run_context.__wrapped__.__code__.co_names


class HeartbeatingEngine:
    """What `_send_heartbeats` reads of an engine; counts the heartbeats it is asked to send."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger(__name__)

    def __init__(self) -> None:
        self.sent = 0

    def _build_heartbeat_event_template(self):
        return {}, []

    def _emit_flow_run_heartbeat(self, resource, related) -> None:
        self.sent += 1


def test_a_run_does_not_wait_for_its_heartbeat_thread_and_no_heartbeat_follows():
    engine = HeartbeatingEngine()
    before = set(threading.enumerate())
    with flow_engine._send_heartbeats(engine):
        time.sleep(0.1)  # the thread has sent its first heartbeat and sleeps
    # Prefect's join would have waited here until the thread ended (up to a second).
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()], "the run waited for its thread"
    time.sleep(1.5)  # the thread wakes, sees it was stopped, and ends without sending
    assert not [t for t in threading.enumerate() if t not in before]
    assert engine.sent == 1


# --- related resources, once per flow run ----------------------------------------------------

def test_the_events_worker_still_looks_the_related_resources_up_by_the_name_we_replace():
    from prefect.events.worker import EventsWorker

    assert "related_resources_from_run_context" in EventsWorker.attach_related_resources_from_context.__code__.co_names
    assert events_worker.related_resources_from_run_context is engine_tuning._related_resources_once_per_flow_run


class ReadingClient:
    """What Prefect reads of the server for a flow run's related resources, as real-looking objects."""

    def __init__(self, flow_run: FlowRun) -> None:
        self.objects = {
            flow_run.flow_id: SimpleNamespace(id=flow_run.flow_id, name="ingest", tags=[]),
            flow_run.deployment_id: SimpleNamespace(id=flow_run.deployment_id, name="orders", tags=["pipeline"]),
            flow_run.work_queue_id: SimpleNamespace(id=flow_run.work_queue_id, name="default", tags=[]),
            flow_run.work_pool_name: SimpleNamespace(id=uuid4(), name=flow_run.work_pool_name, tags=[]),
        }
        self.read_flow = self.read_deployment = self.read_work_queue = self.read_work_pool = self.read

    async def read(self, obj_id):
        return self.objects[obj_id]


def _task_run_event_exclude(task_run: TaskRun) -> set[str]:
    # What a task run's state event names (utilities/engine: emit_task_run_state_change_event).
    return {f"prefect.task-run.{task_run.id}", *(f"prefect.tag.{tag}" for tag in task_run.tags)}


@pytest.mark.parametrize("event_history", [True, False])
def test_a_task_runs_events_relate_to_the_same_resources_as_prefect_says_computed_once(monkeypatch, event_history):
    """With Prefect's events stored, to all Prefect lists; without, to the flow run and flow only."""
    flow_run = FlowRun(id=uuid4(), name="calm-otter", flow_id=uuid4(), deployment_id=uuid4(),
                       work_queue_id=uuid4(), work_pool_name="ingest", tags=["nightly"])
    client = ReadingClient(flow_run)
    task_runs = [TaskRun(id=uuid4(), name=f"records/{i}", flow_run_id=flow_run.id, task_key="process_record",
                         dynamic_key=str(i), tags=tags) for i, tags in enumerate([[], [], ["vip"], []])]
    computed = []

    async def counted(client, exclude=None):
        computed.append(exclude)
        return await related.related_resources_from_run_context(client=client, exclude=exclude)

    monkeypatch.setattr(engine_tuning, "_related_resources", counted)
    monkeypatch.setattr(engine_tuning, "get_settings", lambda: SimpleNamespace(prefect_event_history=event_history))
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: SimpleNamespace(flow_run=flow_run)))
    related.RESOURCE_CACHE.clear()
    for task_run in task_runs:
        monkeypatch.setattr(TaskRunContext, "get", classmethod(lambda cls, task_run=task_run: SimpleNamespace(task_run=task_run)))
        exclude = _task_run_event_exclude(task_run)
        for _ in range(3):  # Pending, Running, Completed
            ours = asyncio.run(events_worker.related_resources_from_run_context(client=client, exclude=exclude))
            prefects = asyncio.run(related.related_resources_from_run_context(client=client, exclude=exclude))
            if not event_history:
                prefects = [r for r in prefects if r.role in ("flow-run", "flow")]
                assert {r.id for r in ours} == {f"prefect.flow-run.{flow_run.id}", f"prefect.flow.{flow_run.flow_id}"}
            else:
                assert {r.id for r in ours} >= {f"prefect.flow-run.{flow_run.id}", f"prefect.deployment.{flow_run.deployment_id}",
                                                "prefect.tag.nightly", "prefect.tag.pipeline"}
            assert [r.model_dump() for r in ours] == [r.model_dump() for r in prefects]
    assert len(computed) == 2  # once for the task runs without tags, once for the one tagged vip


def test_other_events_are_worked_out_each_time(monkeypatch):
    calls = []

    async def counted(client, exclude=None):
        calls.append(exclude)
        return []

    monkeypatch.setattr(engine_tuning, "_related_resources", counted)
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: SimpleNamespace(flow_run=SimpleNamespace(id=uuid4()))))
    monkeypatch.setattr(TaskRunContext, "get", classmethod(lambda cls: None))  # a flow run's own event
    for _ in range(2):
        asyncio.run(events_worker.related_resources_from_run_context(client=None, exclude={"prefect.flow-run.x"}))
    assert len(calls) == 2
