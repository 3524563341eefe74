"""Faults on the core path: a consumer killed mid-batch, a message that kills consumers, the
Prefect server down, a worker dead while starting a run. (`make faults` runs more, against a
stack under supervisord.)"""

from __future__ import annotations

import asyncio
import threading
import uuid

from tests.fixtures.checks import assert_exactly_once, records
from tests.fixtures.stack import Outgoing, wait_for


def test_consumer_killed_mid_batch_loses_and_duplicates_nothing(stack):
    pipeline = stack.pipeline("kill")
    source = f"kill-{uuid.uuid4().hex[:8]}"
    consumer = stack.start("consumer-kill", "consumer", "-p", pipeline.name)
    messages = records(source, 3000)
    publisher = threading.Thread(target=stack.publish, args=(pipeline.name, messages))
    publisher.start()
    # Kill while batches are being committed and more messages are in flight.
    wait_for(lambda: stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s", (pipeline.name,)) >= 300,
             60, "the first batches committed", stack, interval=0.05)
    consumer.kill()
    committed_at_kill = stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s", (pipeline.name,))
    publisher.join()
    assert committed_at_kill < 3000, "the consumer was killed too late to test anything"
    stack.start("consumer-kill", "consumer", "-p", pipeline.name)

    assert_exactly_once(stack, pipeline, source, 3000)


def test_prefect_server_down_messages_wait_in_the_inbox(stack):
    pipeline = stack.pipeline("outage")
    source = f"outage-{uuid.uuid4().hex[:8]}"
    server = stack.processes["server"]
    server.stop()
    try:
        stack.publish(pipeline.name, records(source, 500))
        # The queue drains into the inbox although no flow run can be created...
        wait_for(lambda: stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s", (pipeline.name,)) == 500
                 and stack.queue_depth(pipeline.queue) == 0, 60, "the queue drained into the inbox", stack)
        # ...and the batches wait, pending, retried with backoff.
        wait_for(lambda: stack.scalar("SELECT count(*) FROM batches WHERE pipeline = %s AND attempts > 0",
                                      (pipeline.name,)) > 0, 60, "submission attempts", stack)
        assert stack.scalar("SELECT count(*) FROM batches WHERE pipeline = %s AND status = 'submitted'",
                            (pipeline.name,)) == 0
        error = stack.scalar("SELECT last_error FROM batches WHERE pipeline = %s AND last_error IS NOT NULL LIMIT 1",
                             (pipeline.name,))
        assert error
        # ...which the consumer's metrics show: failed submissions, pending batches, waiting records.
        batches = stack.scalar("SELECT count(*) FROM batches WHERE pipeline = %s", (pipeline.name,))
        wait_for(lambda: stack.metric("ingest_batches_pending", pipeline=pipeline.name) == batches
                 and stack.metric("ingest_inbox_oldest_pending_seconds", pipeline=pipeline.name) > 0
                 and stack.metric("ingest_batch_submit_failures_total", pipeline=pipeline.name) > 0,
                 30, "the backlog in the metrics", stack)
    finally:
        stack.start("server", "server")
    # Once the server is back, every batch gets its one flow run and everything is stored.
    if not stack.processes["worker"].alive:  # under supervisord it would be restarted
        stack.start("worker", "worker")
    assert_exactly_once(stack, pipeline, source, 500)
    wait_for(lambda: stack.metric("ingest_batches_pending", pipeline=pipeline.name) == 0
             and stack.metric("ingest_inbox_oldest_pending_seconds", pipeline=pipeline.name) == 0,
             30, "no backlog in the metrics", stack)


def test_run_abandoned_in_pending_by_a_dead_worker_is_scheduled_again(stack):
    """A worker killed between claiming a run (Pending) and starting it left the run Pending
    for ever, and its batch's records unprocessed: consumers now schedule such runs again."""
    from prefect.client.orchestration import PrefectClient
    from prefect.states import Pending

    pipeline = stack.pipeline("abandoned")
    source = f"abandoned-{uuid.uuid4().hex[:8]}"
    stack.processes["worker"].stop()
    try:
        stack.start("consumer-abandoned", "consumer", "-p", pipeline.name, env={"INGEST_ABANDONED_RUN_SECONDS": "3"})
        stack.publish(pipeline.name, records(source, 50))
        runs = wait_for(lambda: stack.flow_runs(pipeline), 60, "the batch's flow run", stack)

        async def claim_and_die() -> None:  # what the killed worker leaves behind
            async with PrefectClient(stack.api_url) as client:
                for run in runs:
                    await client.set_flow_run_state(run.id, Pending(), force=True)

        asyncio.run(claim_and_die())
    finally:
        stack.start("worker", "worker")
    assert_exactly_once(stack, pipeline, source, 50)


def test_message_that_kills_consumers_is_dead_lettered_alone(stack):
    """A message that kills its consumer on every delivery (as a crash in a C extension would;
    here the test-only crash header) ends in the DLQ by the delivery limit, and the records
    delivered with it are stored. Each crash counted a delivery for every message the consumer
    held, so they used to reach the limit and be dead-lettered with it."""
    pipeline = stack.pipeline("poison")
    source = f"poison-{uuid.uuid4().hex[:8]}"
    messages = records(source, 301)
    poison = messages[150]
    messages[150] = Outgoing(poison.body, poison.message_id, headers={"x-test-crash": "1"})
    stack.publish(pipeline.name, messages)  # queued before the consumer starts: many are delivered with it
    crashes = 0
    for _ in range(2 * pipeline.delivery_limit):  # supervisord's part: restart the consumer when it dies
        consumer = stack.start("consumer-poison", "consumer", "-p", pipeline.name,
                               env={"INGEST_TEST_CRASH_HEADER": "x-test-crash"})
        wait_for(lambda: not consumer.alive or stack.queue_depth(pipeline.dlq), 120, "a crash or a dead letter", stack)
        if consumer.alive:
            break
        crashes += 1
    assert crashes >= 1
    assert_exactly_once(stack, pipeline, source, 300)
    dead = stack.dead_letters(pipeline)
    assert [(m.message_id, m.headers["x-first-death-reason"]) for m in dead] == [(poison.message_id, "delivery_limit")]
