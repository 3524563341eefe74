"""What producers need: `ingest schema` (the contract) and `ingest publish` (JSONL files)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ingest.cli.common import chosen_pipelines, fail, setup_logging
from ingest.settings import get_settings

log = logging.getLogger(__name__)


def schema() -> None:
    """Print the JSON Schema of the record envelope producers publish."""
    import orjson

    from ingest.contract import json_schema

    typer.echo(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode())


def publish(
    file: Annotated[Optional[Path], typer.Argument(help="JSONL file, one record envelope per line; '-' or none: stdin.")] = None,
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="Routing key (pipeline name).")] = "records",
    concurrency: Annotated[int, typer.Option(help="Messages awaiting their confirm at once.")] = 200,
    message_id_field: Annotated[
        Optional[str], typer.Option(help="Use this field of each line's JSON as the AMQP message_id.")
    ] = None,
) -> None:
    """Publish JSONL records with publisher confirms and mandatory routing.

    Lines are sent as they are (bad ones are dead-lettered by the consumers, not here).
    Exits non-zero if any line was not confirmed.
    """
    setup_logging()
    chosen_pipelines([pipeline])
    stream = sys.stdin.buffer if file is None or str(file) == "-" else None
    if stream is None and not file.exists():
        raise fail(f"{file} does not exist", 2)
    published, failed = asyncio.run(
        publish_lines(get_settings().amqp_url, file if stream is None else None, pipeline, concurrency, message_id_field)
    )
    typer.echo(f"published {published}, failed {failed}")
    if failed:
        raise typer.Exit(1)


async def publish_lines(
    amqp_url: str, path: Path | None, pipeline: str, concurrency: int, message_id_field: str | None
) -> tuple[int, int]:
    """Publish each non-blank line of `path` (or stdin) as one message; return (published, failed)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from consumers.publisher import Publisher

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

    async with Publisher(amqp_url) as publisher:
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
    import orjson

    try:
        value = orjson.loads(line).get(name)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return None if value is None else str(value)
