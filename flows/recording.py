"""Submit many task runs without outrunning the Prefect server's recording of them.

The Prefect server records task runs from their state events, queued in memory, and drops
events once 10,000 wait. Task runs can finish much faster than it records them (per-record
tasks here: about twice as fast on two cores), and a dropped event is a task run missing
from the UI for good. So a flow submits a task run only while at most RECORDING_WINDOW of
its earlier ones are unrecorded: 3 events each, a few runs at once, well under the limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from prefect import Task, get_client, get_run_logger
from prefect.futures import PrefectFuture

from ingest.waiting import TimedOut, poll

RECORDING_WINDOW = 300
# Checked every so many submissions: each check is one request to the server.
CHECK_EVERY = 100
# Bounded, so that a server that lost events for another reason (a restart) cannot stall a run.
RECORDING_WAIT_SECONDS = 60
FINAL_TASK_RUN_STATES = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]


def submit_within_window(task: Task, calls: Iterable[tuple[Any, ...]], flow_run_id: UUID | None) -> list[PrefectFuture]:
    """`task.submit(*args)` for each of `calls`, pausing while RECORDING_WINDOW are unrecorded.

    Without a flow run id (a flow called outside Prefect's runs) nothing is recorded: no pause.
    """
    futures = []
    for submitted, args in enumerate(calls):
        if flow_run_id and submitted >= RECORDING_WINDOW and submitted % CHECK_EVERY == 0:
            _wait_until_recorded(flow_run_id, submitted - RECORDING_WINDOW)
        futures.append(task.submit(*args))
    return futures


def _wait_until_recorded(flow_run_id: UUID, count: int) -> None:
    """Until the server has recorded `count` finished task runs of this flow run."""
    body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}},
            "task_runs": {"state": {"type": {"any_": FINAL_TASK_RUN_STATES}}}}
    with get_client(sync_client=True) as client:
        try:
            poll(lambda: client.request("POST", "/task_runs/count", json=body).json(), until=lambda n: n >= count,
                 timeout=RECORDING_WAIT_SECONDS, interval=0.2, what="task runs recorded")
        except TimedOut as exc:
            get_run_logger().warning("the Prefect server has recorded %d of %d task runs after %ds; going on",
                                     exc.last, count, RECORDING_WAIT_SECONDS)
