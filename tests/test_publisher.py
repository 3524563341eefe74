"""Our publisher on the real broker: a message given no id gets one derived from its body,
so a retry or a re-publish of the same body has the same inbox key (aiormq alone would
invent a random id for each attempt)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika

from consumers.publisher import Publisher
from ingest.contract import message_key
from tests.fixtures.services import AMQP_URL

BODY = b'{"id": "1", "source": "pub", "type": "t", "occurred_at": "2024-05-01T12:00:00Z", "data": {}}'


async def _publish_and_read(publish) -> list[str | None]:
    routing_key = f"pub-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("ingest", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key)
        async with Publisher(AMQP_URL) as publisher:
            await publish(publisher, routing_key)
        ids = []
        while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            ids.append(message.message_id)
        return ids


def test_a_message_without_an_id_gets_its_body_hash_every_time():
    async def twice(publisher, routing_key):
        await publisher.publish(BODY, routing_key)
        await publisher.publish(BODY, routing_key)

    assert asyncio.run(_publish_and_read(twice)) == [message_key(BODY, None)] * 2


def test_a_producers_own_id_is_kept():
    async def once(publisher, routing_key):
        await publisher.publish(BODY, routing_key, message_id="order-1-v1")

    assert asyncio.run(_publish_and_read(once)) == ["order-1-v1"]
