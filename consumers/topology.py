"""Exchanges and queues, declared by code, idempotently (bootstrap and every consumer)."""

from __future__ import annotations

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange

from ingest.pipelines import DEAD_LETTER_EXCHANGE, EXCHANGE, Pipeline


class TopologyMismatch(Exception):
    pass


def queue_arguments(pipeline: Pipeline) -> dict:
    return {
        "x-queue-type": "quorum",
        # A message that keeps crashing consumers is dead-lettered after this many deliveries...
        "x-delivery-limit": pipeline.delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": pipeline.name,
        # ...and at-least-once dead-lettering makes sure the broker never drops it on the way.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_exchanges(channel: AbstractChannel) -> tuple[AbstractExchange, AbstractExchange]:
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    return exchange, dlx


async def declare_topology(connection: aio_pika.abc.AbstractConnection, pipelines: list[Pipeline]) -> None:
    """Declare `ingest`, `ingest.dlx` and each pipeline's queue and DLQ."""
    for pipeline in pipelines:
        # A failed declaration closes the channel: one channel per pipeline keeps errors apart.
        async with connection.channel() as channel:
            exchange, dlx = await declare_exchanges(channel)
            try:
                dlq = await channel.declare_queue(pipeline.dlq, durable=True, arguments={"x-queue-type": "quorum"})
                await dlq.bind(dlx, routing_key=pipeline.name)
                queue = await channel.declare_queue(pipeline.queue, durable=True, arguments=queue_arguments(pipeline))
                await queue.bind(exchange, routing_key=pipeline.name)
            except aiormq.exceptions.PreconditionFailed as exc:
                raise TopologyMismatch(
                    f"queue for pipeline {pipeline.name!r} exists with other arguments ({exc}); "
                    "queue arguments cannot change in place: drain and delete the queue, then bootstrap again"
                ) from None
