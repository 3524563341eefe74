"""A worker learns of a new flow run from PostgreSQL (LISTEN/NOTIFY), not only by polling.

The stack's worker is replaced by one that polls every 5 minutes: records still get stored
within seconds, so the NOTIFY of their batch's run woke it; and they still do after its
LISTEN connection was killed, which it reconnects on its own."""

from __future__ import annotations

import uuid

from flows.worker import APPLICATION_NAME
from tests.fixtures.checks import records
from tests.fixtures.stack import wait_for

POLL_SECONDS = 300
# Far below the poll interval: only a wake-up can have found the runs this soon.
STORED_WITHIN = 90


def listener_pids(stack) -> list[int]:
    return [pid for (pid,) in stack.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
        (APPLICATION_NAME,))]


def stored(stack, pipeline, source: str) -> int:
    return stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,))


def test_a_worker_that_hardly_polls_is_woken_for_each_new_run_even_after_losing_its_connection(stack):
    pipeline = stack.pipeline("wake")
    stack.start_consumer("consumer-wake", pipeline)
    stack.processes["worker"].stop()
    try:
        worker = stack.start("worker-wake", "worker", env={"INGEST_WORKER_POLL_SECONDS": str(POLL_SECONDS)})
        # Its one poll at start is over once it says it started; it listens by then or soon after.
        wait_for(lambda: "started!" in worker.log_path.read_text(errors="replace") and listener_pids(stack),
                 120, "the worker started and listening", stack)
        first = f"wake-{uuid.uuid4().hex[:8]}"
        stack.publish(pipeline.name, records(first, 30))
        wait_for(lambda: stored(stack, pipeline, first) == 30, STORED_WITHIN, f"records of {first} stored", stack)

        [killed] = listener_pids(stack)
        stack.scalar("SELECT pg_terminate_backend(%s)", (killed,))
        wait_for(lambda: [pid for pid in listener_pids(stack) if pid != killed], 60, "the listener back", stack)
        second = f"wake-{uuid.uuid4().hex[:8]}"
        stack.publish(pipeline.name, records(second, 30))
        wait_for(lambda: stored(stack, pipeline, second) == 30, STORED_WITHIN, f"records of {second} stored", stack)

        assert worker.alive, worker.log_tail()
        log = worker.log_path.read_text(errors="replace")
        assert log.count("not listening for new flow runs") == 1, log[-3000:]
        assert "listening for new flow runs again" in log, log[-3000:]
        assert "Duplicate submission" not in log, log[-3000:]
    finally:
        for name in ("worker-wake", "consumer-wake"):
            if name in stack.processes:
                stack.processes[name].stop()
        stack.start("worker", "worker")
