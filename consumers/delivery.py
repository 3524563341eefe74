"""Settling a delivery when its channel may be gone.

After a broker reconnect (aio-pika's robust connection) the consumer goes on with a new
channel, but the messages it took before still carry the delivery tags of the old one. The
broker returned those messages to the queue when the old channel died and delivers them
again: a message of a lost channel is dropped, never acked, nacked or dead-lettered (its
tag means nothing on the new channel, and dead-lettering it would make a second dead letter
when its redelivery is dead-lettered too).
"""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

log = logging.getLogger(__name__)


def channel_lost(message: AbstractIncomingMessage) -> bool:
    """Whether the channel this message came on has closed since (the broker has it back)."""
    try:
        message.channel  # aio-pika raises for a closed channel
    except ChannelInvalidStateError:
        return True
    return False


def label(message: AbstractIncomingMessage) -> str:
    """How logs name a message: its id, else its delivery tag."""
    return message.message_id or f"#{message.delivery_tag}"


async def give_back(message: AbstractIncomingMessage) -> None:
    """Return it to the queue (nack, requeue); on a lost channel the broker already has."""
    if channel_lost(message):
        return
    try:
        await message.nack(requeue=True)
    except Exception as exc:  # the channel lost meanwhile: the broker returns it all the same
        log.warning("message %s: not returned to the queue (%s); the broker redelivers it", label(message), exc)
