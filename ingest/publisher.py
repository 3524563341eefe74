"""Publishing records the way the contract asks: confirms, mandatory routing, retries.

    async with Publisher(settings.amqp_url) as publisher:
        await publisher.publish(body, pipeline="records", message_id="order-42-v3")

A message the broker did not confirm (connection lost, nack) is published again with the
same message id, so the inbox keeps one copy however many times it arrives. A message no
queue is bound for (unknown pipeline) is not retried: it raises `Unroutable`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

import aio_pika
import orjson
from aio_pika.exceptions import PublishError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from tenacity import AsyncRetrying, retry_if_not_exception_type, stop_after_attempt, wait_random_exponential

from ingest.pipelines import EXCHANGE

log = logging.getLogger(__name__)


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
            message_id=message_id,
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


def publish_lines(
    settings, path: Path | None, pipeline: str, concurrency: int, message_id_field: str | None
) -> tuple[int, int]:
    """Publish each non-blank line of `path` (or stdin) as one message; return (published, failed)."""
    return asyncio.run(_publish_lines(settings, path, pipeline, concurrency, message_id_field))


async def _publish_lines(settings, path, pipeline, concurrency, message_id_field) -> tuple[int, int]:
    counts = {"published": 0, "failed": 0}
    slots = asyncio.Semaphore(concurrency)
    source = open(path, "rb") if path else sys.stdin.buffer
    total = path.stat().st_size if path else None
    progress = Progress(
        TextColumn("publishing"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[counts]}"),
        TimeRemainingColumn(), console=Console(stderr=True), disable=not sys.stderr.isatty(),
    )

    async def send(number: int, line: bytes) -> None:
        try:
            message_id = _field(line, message_id_field) if message_id_field else None
            await publisher.publish(line, pipeline, message_id=message_id)
            counts["published"] += 1
        except Exception as exc:
            counts["failed"] += 1
            log.error("line %d not published: %s", number, exc)
        finally:
            slots.release()

    async with Publisher(settings.amqp_url) as publisher:
        with source, progress:
            bar = progress.add_task("publish", total=total, counts="")
            tasks = set()
            for number, raw in enumerate(source, start=1):
                line = raw.strip()
                progress.update(bar, advance=len(raw), counts=f"{counts['published']} ok, {counts['failed']} failed")
                if not line:
                    continue
                await slots.acquire()
                task = asyncio.create_task(send(number, line))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if progress.disable and number % 10_000 == 0:
                    log.info("%d lines read, %d published, %d failed", number, counts["published"], counts["failed"])
            await asyncio.gather(*tasks)
    return counts["published"], counts["failed"]


def _field(line: bytes, name: str) -> str | None:
    try:
        value = orjson.loads(line).get(name)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return None if value is None else str(value)
