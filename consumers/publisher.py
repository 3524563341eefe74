"""Publishing records the way the contract asks: confirms, mandatory routing, retries.

    async with Publisher(settings.amqp_url) as publisher:
        await publisher.publish(body, pipeline="records", message_id="order-42-v3")

A message the broker did not confirm (connection lost, nack) is published again with the
same message id, so the inbox keeps one copy however many times it arrives. A message
published without one gets `sha256:<body hash>` (ingest.contract.message_key): aiormq
would otherwise invent a random id for each attempt, and a retried or re-published
message would be stored twice. A message no
queue is bound for (unknown pipeline) is not retried: it raises `Unroutable`.
"""

from __future__ import annotations

import os
import socket

import aio_pika
from aio_pika.exceptions import PublishError
from tenacity import AsyncRetrying, retry_if_not_exception_type, stop_after_attempt, wait_random_exponential

from ingest.contract import message_key
from ingest.pipelines import EXCHANGE



class Unroutable(Exception):
    pass


class Publisher:
    def __init__(self, amqp_url: str, retries: int = 5, connection_name: str | None = None):
        self.amqp_url = amqp_url
        self.retries = retries
        self.connection_name = connection_name or f"ingest-publisher {socket.gethostname()} pid {os.getpid()}"

    async def __aenter__(self) -> "Publisher":
        self.connection = await aio_pika.connect_robust(
            self.amqp_url, client_properties={"connection_name": self.connection_name}
        )
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.exchange = await self.channel.get_exchange(EXCHANGE, ensure=True)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.connection.close()

    async def publish(
        self,
        body: bytes,
        pipeline: str,
        message_id: str | None = None,
        content_type: str | None = "application/json",
        headers: dict | None = None,
    ) -> None:
        """Return once the broker confirmed the message; raise after the last retry."""
        message = aio_pika.Message(
            body,
            message_id=message_id or message_key(body, None),
            content_type=content_type,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self.publish_message(message, pipeline)

    async def publish_message(self, message: aio_pika.Message, pipeline: str) -> None:
        """`publish()` for a message the caller built with all its properties (a re-driven dead letter)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_not_exception_type(Unroutable),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            stop=stop_after_attempt(self.retries + 1),
            reraise=True,
        ):
            with attempt:
                try:
                    await self.exchange.publish(message, routing_key=pipeline, mandatory=True, timeout=30)
                except PublishError as exc:
                    raise Unroutable(f"no queue is bound for pipeline {pipeline!r} on exchange {EXCHANGE!r}") from exc
