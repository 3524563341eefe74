"""`ingest status` browses each DLQ on the real broker to count its reasons: every dead
letter must stay where it was, and the bodies must not pile up in the client."""

from __future__ import annotations

import asyncio
import tracemalloc
import uuid

import aio_pika

from ingest.cli.status import _dlq_reasons
from ingest.pipelines import Pipeline
from tests.fixtures.services import AMQP_URL

BODY_BYTES = 64 * 1024
MESSAGES = 200  # 12.5 MiB of bodies


def test_counting_reasons_leaves_the_dlq_intact_and_keeps_no_bodies():
    pipeline = Pipeline(name=f"dlqstatus_{uuid.uuid4().hex[:8]}")
    reasons = ["too_large", "invalid", "id_conflict", "delivery_limit"]

    async def scenario() -> tuple[dict, int, list[bytes]]:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(pipeline.dlq, durable=True)
            try:
                for i in range(MESSAGES):
                    await channel.default_exchange.publish(
                        aio_pika.Message(i.to_bytes(4, "big") * (BODY_BYTES // 4),
                                         headers={"x-error-reason": reasons[i % len(reasons)]}),
                        routing_key=pipeline.dlq)
                tracemalloc.start()
                try:
                    counted = await _dlq_reasons(connection, pipeline)
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                bodies = []
                while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
                    bodies.append(message.body[:4])
                return counted, peak, bodies
            finally:
                await queue.delete(if_unused=False, if_empty=False)

    counted, peak, bodies = asyncio.run(scenario())
    assert counted == {"ready": MESSAGES, "reasons": {r: MESSAGES // len(reasons) for r in reasons}}
    assert sorted(bodies) == [i.to_bytes(4, "big") for i in range(MESSAGES)], "every dead letter back in the DLQ"
    assert peak < MESSAGES * BODY_BYTES / 4, f"status held {peak} bytes browsing {MESSAGES * BODY_BYTES}"
