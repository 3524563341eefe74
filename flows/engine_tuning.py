"""What our flow-run processes change in Prefect's flow engine, and why. Imported by every
flow module, so a run has these whether its process was forked warm or started cold.

- No suspension watch. Prefect watches each flow run of a deployment for suspension
  (`suspend_flow_run`) through a subscription to the server's event stream. While any
  process subscribes, the server parses and filters every event it receives once more:
  with a task run per record, three events a record, 5% of the server's CPU, and the server
  is what bounds `record` throughput. These flows never suspend.
- No wait for the heartbeat thread. After a run's final state the engine joins its
  heartbeat thread, which sleeps in steps of a second: the process lives up to a second
  longer (half a second on average), and holds its worker's slot meanwhile. The thread is a
  daemon and sends nothing once told to stop (nor after a final state), so the run does not
  wait for it, as Prefect's engine for async flows does not.
- A task run's events get their related resources worked out once per flow run. Before
  sending each event, Prefect lists what it relates to (flow run, flow, deployment, work
  queue, work pool, their tags), building and validating each again: three events a task
  run, 16% of a flow run's CPU with a task run per record (py-spy, 2026-12-02). For a task
  run's own events the list depends only on the flow run and on the ids the event already
  names besides the task run (its tags), so the first answer is kept for the others.
- Unless Prefect's events are stored (INGEST_PREFECT_EVENT_HISTORY), a task run's events
  relate only to its flow run and flow, as those of a flow run outside a deployment do.
  The server parses each event three times (on arrival, to record the task run, to
  evaluate automations), and the deployment, work queue, work pool and tags (five more
  resources) cost it about 0.5 ms of CPU a task run, 12% of what it spends on one (record
  and the ceiling alternated on one stack, 2026-12-03); it needs only the flow run to
  record the task run. An automation matching task-run events by deployment, work pool or tag then does
  not match them (none of ours does: they watch flow runs, whose events keep everything).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

from prefect import flow_engine
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import worker as events_worker

from ingest.settings import get_settings

flow_engine.observe_flow_run_suspension = lambda flow_run_id, suspension_request: nullcontext()

flow_engine._send_heartbeats = partial(flow_engine._send_heartbeats, join_on_exit=False)

_related_resources = events_worker.related_resources_from_run_context
_RELATED_KEPT = 100  # a flow run's process needs one or a few: tasks with other tags
_related_kept: dict[tuple, list] = {}
_RELATED_WHEN_NOT_STORED = ("flow-run", "flow")


async def _related_resources_once_per_flow_run(client, exclude=None) -> list:
    flow_run_context, task_run_context = FlowRunContext.get(), TaskRunContext.get()
    own = f"prefect.task-run.{task_run_context.task_run.id}" if task_run_context else None
    if flow_run_context is None or own is None or exclude is None or own not in exclude:
        return await _related_resources(client=client, exclude=exclude)
    key = (flow_run_context.flow_run.id, frozenset(exclude - {own}))
    if key not in _related_kept:
        if len(_related_kept) >= _RELATED_KEPT:
            _related_kept.clear()
        related = await _related_resources(client=client, exclude=exclude)
        if not get_settings().prefect_event_history:
            related = [r for r in related if r.role in _RELATED_WHEN_NOT_STORED]
        _related_kept[key] = related
    return list(_related_kept[key])


events_worker.related_resources_from_run_context = _related_resources_once_per_flow_run
