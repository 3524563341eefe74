"""Dead-lettering invalid messages on their first delivery, with the reason in headers."""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from consumers import metrics
from consumers.delivery import channel_lost, give_back, label
from ingest.contract import InvalidMessage
from ingest.pipelines import DEAD_LETTER_EXCHANGE, Pipeline

log = logging.getLogger(__name__)

# AMQP properties copied onto the dead letter, so a re-drive republishes the original.
KEPT_PROPERTIES = (
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
)


def dead_letter_of(message: AbstractIncomingMessage, error: InvalidMessage, pipeline: str) -> aio_pika.Message:
    headers = dict(message.headers or {})
    headers.update({"x-error-reason": error.reason, "x-error": error.error[:4000], "x-pipeline": pipeline})
    kept = {name: getattr(message, name) for name in KEPT_PROPERTIES if getattr(message, name) is not None}
    kept["delivery_mode"] = aio_pika.DeliveryMode.PERSISTENT
    return aio_pika.Message(message.body, headers=headers, **kept)


def dead_letter_reason(headers: dict) -> str:
    """Why a dead letter died: our consumers set x-error-reason; the broker's own
    dead-lettering (delivery limit) sets x-first-death-reason."""
    if "x-error-reason" in headers:
        reason = headers["x-error-reason"]
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    reason = headers.get("x-first-death-reason")
    if reason:
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    return "unknown"


class DeadLetterer:
    def __init__(self, channel: AbstractChannel, pipeline: Pipeline):
        self.channel = channel
        self.pipeline = pipeline

    async def start(self) -> None:
        self.exchange = await self.channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=True)

    async def reject(self, message: AbstractIncomingMessage, error: InvalidMessage) -> None:
        """Publish to `<pipeline>.dlq` and wait for the broker's confirm, then ack the original.

        If the publish fails the original is returned to the queue and tried again. A message
        of a lost channel is left to its redelivery (consumers/delivery.py).
        """
        if channel_lost(message):
            log.info("message %s of %s: its channel was lost (broker reconnect); left to its redelivery",
                     label(message), self.pipeline.name)
            return
        try:
            await self.exchange.publish(
                dead_letter_of(message, error, self.pipeline.name), routing_key=self.pipeline.name, mandatory=True
            )
        except Exception as exc:
            log.error("message %s of %s: dead-lettering failed (%s: %s), returned to the queue",
                      label(message), self.pipeline.name, type(exc).__name__, exc)
            await give_back(message)
            return
        metrics.DEAD_LETTERED.labels(self.pipeline.name, error.reason).inc()
        log.warning("message %s of %s dead-lettered (%s): %s",
                    label(message), self.pipeline.name, error.reason, error.error[:300])
        try:
            await message.ack()
        except Exception as exc:  # lost between the confirm and the ack: nothing can take the letter back
            log.warning("message %s of %s: ack after dead-lettering failed (%s); its redelivery is dead-lettered "
                        "again", label(message), self.pipeline.name, exc)
