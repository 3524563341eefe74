"""How much a consumer takes from the broker: a bound on the bytes of message bodies it holds.

RabbitMQ counts what it may send a consumer in messages (the prefetch), never in bytes; a
consumer's prefetch is fixed when it starts consuming (quorum queues have no channel-wide
limit), and basic.cancel takes back nothing already sent. Whatever the broker has sent is in
memory, so only the credit the broker is given can bound it.

So a consumer takes messages in windows: one broker consumer (basic.consume) at a time, with
a prefetch of `window` messages, about half the bound in messages of the largest size. An
open window can be sent at most `window` unacked messages, however large. A window that has
used up its credit is cancelled, and the next one opened, only when what is held plus a whole
window of the largest messages still fits in the bound (and fewer than `max_messages` are
held, the count-based limit of before). Messages near the size limit: two windows fill the
bound, and the last one is refilled as its messages are acked. Small ones: windows follow one
another, and batches reach max_records as before. (A window of the whole bound could never be
followed by another while anything at all is held.)

A message leaves our hands when it is settled; the broker may send the next one as soon as it
has the ack. A batch is released just before its ack goes out (consumers/consumer.py), but a
single message (dead-lettered, returned) just after: the bound keeps room for that one message.

`Credit` is the pure logic; `Windows` opens and cancels a pipeline's windows as it allows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from consumers import metrics

log = logging.getLogger(__name__)

# What opening or cancelling a window raises when its channel is gone (a broker reconnect):
# the window is given up, and another opened on the reopened channel.
CHANNEL_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError, asyncio.TimeoutError)
# Holding back for the byte bound is logged at INFO at most this often per pipeline.
HOLDING_BACK_LOG_SECONDS = 60.0


class HeldBytesTooSmall(ValueError):
    pass


def share(max_held_bytes: int, max_message_bytes: int, pipelines: int) -> int:
    """Each pipeline's part of a consumer process's bound; it must hold two messages of the largest size."""
    part = max_held_bytes // pipelines
    if part < 2 * max_message_bytes:
        raise HeldBytesTooSmall(
            f"INGEST_CONSUMER_MAX_HELD_BYTES ({max_held_bytes}) is shared by the {pipelines} pipelines this "
            f"consumer consumes: {part} bytes each, less than two messages of INGEST_MAX_MESSAGE_BYTES "
            f"({max_message_bytes}); raise it to at least {pipelines * 2 * max_message_bytes}, or run fewer "
            f"pipelines per consumer (-p)")
    return part


class Credit:
    """What one pipeline's consumer holds, and whether the broker may be given more."""

    def __init__(self, max_bytes: int, max_message_bytes: int, max_messages: int):
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        self.max_messages = max_messages
        # Room for two windows and the one message settled but not yet released (see above).
        self.window = max(1, min(max_messages, (max_bytes // max_message_bytes - 1) // 2))
        self.bytes = 0
        self.messages = 0
        self.tag: str | None = None  # the open window's consumer tag
        self.in_window = 0  # messages of the open window held: the broker sends it no more once `window` are

    def taken(self, tag: str | None, size: int) -> None:
        self.bytes += size
        self.messages += 1
        if tag is not None and tag == self.tag:
            self.in_window += 1

    def released(self, tag: str | None, size: int) -> None:
        """Acked, returned, dead-lettered, or dropped (its channel lost): no longer in hand."""
        self.bytes -= size
        self.messages -= 1
        if tag is not None and tag == self.tag:
            self.in_window -= 1

    def opened(self, tag: str) -> None:
        self.tag, self.in_window = tag, 0

    def closed(self) -> None:
        """Cancelled (after its cancel-ok nothing more comes), or gone with its channel."""
        self.tag, self.in_window = None, 0

    @property
    def used_up(self) -> bool:
        return self.tag is not None and self.in_window >= self.window

    @property
    def room(self) -> bool:
        """Whether a whole new window of messages of the largest size fits (and the one of above)."""
        largest = self.max_message_bytes
        return self.messages < self.max_messages and self.bytes + (self.window + 1) * largest <= self.max_bytes

    @property
    def wants_window(self) -> bool:
        """No window with credit, and room for one: cancel the used-up one (if any), open another."""
        return (self.tag is None or self.used_up) and self.room

    @property
    def stalled(self) -> bool:
        """The broker sends nothing more until some of what is held is settled."""
        return (self.tag is None or self.used_up) and not self.room

    @property
    def held_back_by_bytes(self) -> bool:
        return self.stalled and self.messages < self.max_messages


class Windows:
    """A pipeline's windows on its channel: opened and cancelled as its `Credit` allows, by one task."""

    def __init__(self, pipeline: str, channel: AbstractRobustChannel, queue: AbstractRobustQueue, credit: Credit,
                 deliver: Callable[[AbstractIncomingMessage], None]):
        self.pipeline = pipeline
        self.channel = channel
        self.queue = queue
        self.credit = credit
        self.deliver = deliver
        self.held_bytes = metrics.HELD_BYTES.labels(pipeline)
        self.changed = asyncio.Event()
        self.stopped = False
        self.reopened = False  # the channel reopened after a broker reconnect
        self.opened = 0
        self.held_back_logged_at = float("-inf")

    async def start(self) -> None:
        await self.channel.set_qos(prefetch_count=self.credit.window)  # every window's; reapplied on reconnects
        self.channel.reopen_callbacks.add(self._channel_reopened)
        log.info("%s: taking messages in windows of %d, holding at most %d bytes of message bodies and %d messages",
                 self.pipeline, self.credit.window, self.credit.max_bytes, self.credit.max_messages)
        await self._next()
        self.keeper = asyncio.create_task(self._keep(), name=f"windows-{self.pipeline}")

    async def stop(self) -> None:
        """No more windows; cancel the open one (what it was sent before its cancel-ok still comes)."""
        self.stopped = True
        self.changed.set()
        await asyncio.gather(self.keeper, return_exceptions=True)
        if self.credit.tag:
            await self.queue.cancel(self.credit.tag)
            self.credit.closed()

    async def taken(self, message: AbstractIncomingMessage) -> None:
        """The consumer callback: a delivered message is in hand from here."""
        self.credit.taken(message.consumer_tag, len(message.body))
        self._moved()
        self.deliver(message)

    def released(self, messages: list[AbstractIncomingMessage]) -> None:
        for message in messages:
            self.credit.released(message.consumer_tag, len(message.body))
        self._moved()

    def _moved(self) -> None:
        self.held_bytes.set(self.credit.bytes)
        self.changed.set()

    async def _keep(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self.stopped:
                return
            try:
                await self._next()
            except CHANNEL_ERRORS as exc:  # the channel's reopening wakes us, or we try again in a second
                log.warning("%s: no window opened (%s: %s), trying again", self.pipeline, type(exc).__name__, exc)
                await asyncio.sleep(1)
                self.changed.set()

    async def _next(self) -> None:
        if self.reopened and self.credit.tag:
            # The window went with the old channel, or was opened on the new one while it
            # reopened: cancelling it is a no-op for the one, and for the other keeps it from
            # being a second window beside the next.
            await self.queue.cancel(self.credit.tag)
            self.credit.closed()
        self.reopened = False
        if self.credit.wants_window and self.credit.tag:
            await self.queue.cancel(self.credit.tag)  # after its cancel-ok the broker sends it nothing more
            self.credit.closed()
        if self.credit.wants_window:  # asked again: what came before the cancel-ok is in hand too
            await self._open()
        self._say_if_held_back()

    async def _open(self) -> None:
        self.opened += 1
        tag = f"{self.pipeline}.{os.getpid()}.w{self.opened}"
        self.credit.opened(tag)  # before basic.consume: its deliveries may come before it returns
        try:
            # The broker cancels a consumer whose queue is deleted: its window is gone then.
            (await self.channel.get_underlay_channel()).on_consumer_cancel_callbacks.add(self._cancelled_by_broker)
            # Not robust: aio-pika would restore it after a reconnect with its whole credit, on
            # top of the messages of the lost channel still in hand; _next opens another then.
            await self.queue.consume(self.taken, no_ack=False, consumer_tag=tag, robust=False)
        except BaseException:
            self.credit.closed()
            raise

    def _say_if_held_back(self) -> None:
        if not self.credit.held_back_by_bytes:
            return
        now = time.monotonic()
        level = logging.INFO if now - self.held_back_logged_at >= HOLDING_BACK_LOG_SECONDS else logging.DEBUG
        if level == logging.INFO:
            self.held_back_logged_at = now
        log.log(level, "%s: holding back: %d bytes of message bodies in hand leave no room for another window of "
                "%d messages within %d bytes; the batch is committed early, more is taken once it is acked",
                self.pipeline, self.credit.bytes, self.credit.window, self.credit.max_bytes)

    def _channel_reopened(self, _channel) -> None:
        self.reopened = True
        self.changed.set()

    def _cancelled_by_broker(self, frame) -> None:
        if frame.consumer_tag == self.credit.tag:
            log.warning("%s: the broker cancelled consumer %s; opening another", self.pipeline, frame.consumer_tag)
            self.credit.closed()
            self.changed.set()
