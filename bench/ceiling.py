"""Prefect's own ceiling: one flow submitting N no-op tasks, in one process, on the same server.

It submits and waits as the `ingest` flow's `record` granularity does, with the same task
runner (threads bounded by the flow's connection pool), but without waiting for the server
to record its task runs (flows/ingest.py RECORDING_WINDOW): Prefect's own behaviour.
Prints the tasks/second of the flow body (flow start-up excluded) and the epoch the body
started at (to time how long the server takes to record the task runs) as JSON on stdout.
"""

from __future__ import annotations

import sys
import time

import orjson
from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE

from flows.ingest import TASK_RUNNER


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="noop-{i}")
def noop(i: int) -> None:
    return None


@flow(name="bench-ceiling", persist_result=False, task_runner=TASK_RUNNER)
def ceiling(count: int) -> dict:
    started_at, started = time.time(), time.perf_counter()
    futures = [noop.submit(i) for i in range(count)]
    for future in futures:
        future.wait()
    return {"tasks_per_second": count / (time.perf_counter() - started), "started_at": started_at,
            "flow_run_id": str(runtime.flow_run.id)}


if __name__ == "__main__":
    print(orjson.dumps(ceiling(int(sys.argv[1]))).decode())
