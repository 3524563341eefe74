"""Prefect's own ceiling: one flow submitting N no-op tasks, in one process, on the same server.

It submits and waits as the `ingest` flow's `record` granularity does: the same task runner
(threads bounded by the flow's connection pool) and the same recording window
(flows/recording.py), so that the server records every task run, as it must for `record`.
`--no-window` submits as fast as Prefect lets it, which outruns the server: it drops state
events and never shows some of the task runs.

Prints, as JSON on stdout, the tasks/second of the flow body (flow start-up excluded), the
epoch the body started at (to time how long the server takes to record the task runs) and
the flow run's id.
"""

from __future__ import annotations

import argparse
import time
from uuid import UUID

import orjson
from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE

from flows.ingest import TASK_RUNNER
from flows.recording import submit_within_window


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="noop-{i}")
def noop(i: int) -> None:
    return None


@flow(name="bench-ceiling", persist_result=False, task_runner=TASK_RUNNER)
def ceiling(count: int, window: bool = True) -> dict:
    run_id = UUID(str(runtime.flow_run.id))
    started_at, started = time.time(), time.perf_counter()
    futures = submit_within_window(noop, ((i,) for i in range(count)), run_id if window else None)
    for future in futures:
        future.wait()
    return {"tasks_per_second": count / (time.perf_counter() - started), "started_at": started_at,
            "flow_run_id": str(run_id)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("count", type=int, help="no-op task runs to submit")
    parser.add_argument("--no-window", action="store_true", help="do not wait for the server to record them")
    args = parser.parse_args()
    print(orjson.dumps(ceiling(args.count, window=not args.no_window)).decode())
