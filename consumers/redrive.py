"""Re-driving a pipeline's dead letters (`ingest replay dlq`, ingest/cli/dlq.py): back to
exchange `ingest`, each once, none duplicated.

Each selected dead letter is re-published with its original body and properties, minus the
dead-lettering headers, plus `x-redriven-by: <replay id>`, with publisher confirms and
mandatory routing; it is acked (removed from the DLQ) only after its confirm. Everything
else stays: messages not selected are held unacked and return to the DLQ when the channel
closes, as do messages whose publish failed. A message that is still invalid is
dead-lettered again by the consumers, to the DLQ's tail: one invocation reads at most the
messages that were in the DLQ when it started, and stops if it meets one carrying its own
replay id, so nothing goes round in a loop.

Message ids. The inbox dedups on `id:<message_id>`, or on `sha256:<body hash>` when a
message has none (`ingest.contract.message_key`). A re-publish through aio-pika cannot go
without a message_id: aiormq invents a random one. So:
- a dead letter with a message_id (the producer's; or, for a message our consumers
  dead-lettered, the random one aiormq gave the dead letter) is re-published with it:
  re-driving it again (say, after a crash between confirm and ack) is deduplicated;
- a dead letter without one (the broker dead-lettered it by delivery limit, keeping the
  producer's id-less properties) gets `message_id = "sha256:<body hash>"`, derived from
  the body, so every re-drive of it has the same inbox key `id:sha256:<hash>`. It is not
  the original key `sha256:<hash>`: should the same body also have been ingested from
  another publish, the inbox holds it twice, and the sink's upsert on (source, id) keeps
  the effect exactly-once.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import get_args

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from consumers.deadletter import KEPT_PROPERTIES, dead_letter_reason
from consumers.publisher import Publisher, Unroutable
from ingest.contract import Reason, message_key
from ingest.pipelines import Pipeline

log = logging.getLogger(__name__)

REDRIVEN_BY = "x-redriven-by"
# Set by our dead-letterer (x-error*, x-pipeline) and by the broker (x-death, x-*-death-*,
# and x-delivery-count on quorum-queue redeliveries): they describe the dead letter, not
# the message, and a message that dies again gets fresh ones.
DEAD_LETTER_HEADERS = ("x-error", "x-error-reason", "x-pipeline", "x-death", "x-delivery-count")
DEAD_LETTER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")
# Our consumers' reasons, then the broker's (x-first-death-reason), then dead_letter_reason()'s fallback.
REASONS = (*get_args(Reason), "delivery_limit", "rejected", "expired", "maxlen", "unknown")
SAMPLES_PER_REASON = 5
# The broker unreachable or the connection lost: what we did not ack stays in the DLQ.
BROKER_ERRORS = (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, OSError, TimeoutError)


class DlqUnavailable(Exception):
    pass


@dataclass
class Redrive:
    """What one invocation did (or, in a dry run, would do), counted by dead-letter reason."""

    replay_id: str
    depth: int = 0  # messages in the DLQ when it started
    consumers: int = 0  # consumers on the pipeline's queue when it started
    republished: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    samples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> [(message id, error)]
    stopped: str | None = None  # why it stopped before reading `depth` messages, if it did
    error: str | None = None  # why it stopped if that is a failure (broker trouble)


def _text(value) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else None if value is None else str(value)


def redriven(message: AbstractIncomingMessage, replay_id: str) -> aio_pika.Message:
    """The original message again: body and properties as dead-lettered, dead-letter headers dropped."""
    headers = {
        name: value for name, value in (message.headers or {}).items()
        if name not in DEAD_LETTER_HEADERS and not name.startswith(DEAD_LETTER_HEADER_PREFIXES)
    }
    headers[REDRIVEN_BY] = replay_id
    properties = {name: getattr(message, name) for name in KEPT_PROPERTIES if getattr(message, name) is not None}
    properties["delivery_mode"] = aio_pika.DeliveryMode.PERSISTENT
    # See the module docstring: a stable id instead of the random one aiormq would invent.
    properties.setdefault("message_id", message_key(message.body, None))
    return aio_pika.Message(message.body, headers=headers, **properties)


async def _depth(connection: AbstractConnection, queue: str, missing: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, or DlqUnavailable naming what is missing."""
    # A failed passive declare closes its channel: use one of its own.
    channel = await connection.channel()
    try:
        ok = (await channel.declare_queue(queue, passive=True)).declaration_result
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise DlqUnavailable(f"queue {queue!r} does not exist: {missing}") from None
    await channel.close()
    return ok.message_count, ok.consumer_count


async def redrive(
    settings, pipeline: Pipeline, reasons: list[str], limit: int | None, dry_run: bool, replay_id: str,
    on_progress: Callable[[int, int, str], None],
) -> Redrive:
    """Re-publish the selected dead letters of `pipeline` (all if `reasons` is empty), at most `limit`."""
    report = Redrive(replay_id)
    connection = await aio_pika.connect(
        settings.amqp_url, client_properties={"connection_name": f"ingest replay dlq {socket.gethostname()} {replay_id}"}
    )
    async with connection:
        report.depth, _ = await _depth(connection, pipeline.dlq, "is the pipeline bootstrapped (ingest bootstrap)?")
        _, report.consumers = await _depth(connection, pipeline.queue, "run ingest bootstrap first")
        # Not robust: a reconnect would drop the deliveries we hold, and their tags with them.
        channel = await connection.channel()
        try:
            if dry_run:
                await _scan(channel, pipeline, reasons, limit, report, None, on_progress)
            else:
                async with Publisher(settings.amqp_url, connection_name=f"ingest replay dlq {replay_id}") as publisher:
                    await _scan(channel, pipeline, reasons, limit, report, publisher, on_progress)
        except BROKER_ERRORS as exc:
            # Re-published but not yet acked messages are re-driven again next time, with
            # the same message id: the inbox keeps one copy.
            report.error = f"RabbitMQ: {type(exc).__name__}: {exc}; what was not acked stays in the DLQ"
        # Closing the channel returns every message we did not ack to the DLQ.
    return report


async def _scan(
    channel: AbstractChannel, pipeline: Pipeline, reasons: list[str], limit: int | None, report: Redrive,
    publisher: Publisher | None, on_progress: Callable[[int, int, str], None],
) -> None:
    queue = await channel.get_queue(pipeline.dlq, ensure=False)
    taken = 0
    for seen in range(1, report.depth + 1):
        # Messages we do not ack stay with us, so each get brings the next one.
        message = await queue.get(no_ack=False, fail=False, timeout=30)
        if message is None:
            report.stopped = "the DLQ emptied meanwhile (another re-drive or a consumer?)"
            break
        headers = message.headers or {}
        if _text(headers.get(REDRIVEN_BY)) == report.replay_id:
            report.stopped = "met a message this replay re-published, dead-lettered again"
            break
        reason = dead_letter_reason(headers)
        if (reasons and reason not in reasons) or (limit is not None and taken >= limit):
            report.kept[reason] += 1
        else:
            taken += 1
            _sample(report, reason, message)
            if publisher is None:
                report.republished[reason] += 1
            elif not await _republish(publisher, pipeline, message, report, reason):
                break
        on_progress(seen, report.depth, f"{sum(report.republished.values())} {'to re-publish' if publisher is None else 're-published'}")


async def _republish(
    publisher: Publisher, pipeline: Pipeline, message: AbstractIncomingMessage, report: Redrive, reason: str
) -> bool:
    """Publish, then ack: the DLQ copy goes only once the broker has the new one. False: stop."""
    try:
        await publisher.publish_message(redriven(message, report.replay_id), pipeline.name)
    except Unroutable as exc:  # every other message would fail alike
        report.failed[reason] += 1
        report.error = f"{exc}; is the pipeline bootstrapped (ingest bootstrap)?"
        return False
    except Exception as exc:
        report.failed[reason] += 1
        log.error("dead letter %s not re-published, left in the DLQ: %s: %s",
                  message.message_id or "(no id)", type(exc).__name__, exc)
        return True
    await message.ack()
    report.republished[reason] += 1
    return True


def _sample(report: Redrive, reason: str, message: AbstractIncomingMessage) -> None:
    samples = report.samples.setdefault(reason, [])
    if len(samples) < SAMPLES_PER_REASON:
        headers = message.headers or {}
        error = _text(headers.get("x-error")) or f"dead-lettered by the broker ({reason})"
        samples.append((message.message_id or "(no message id)", error))
