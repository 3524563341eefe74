"""What every command shares: logging, usage errors, the pipelines chosen, progress, replay ids."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from ingest.settings import get_settings

log = logging.getLogger(__name__)

PipelineOption = Annotated[
    Optional[list[str]], typer.Option("--pipeline", "-p", help="Only this pipeline (repeatable). Default: all.")
]


def setup_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 1) -> typer.Exit:
    """An error line on stderr and the exit to raise: `raise fail(...)` (2: a usage error)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def chosen_pipelines(names: list[str] | None = None, check_steps: bool = False):
    """The pipelines of the config that `names` name (all if none); a usage error for an unknown one.

    `check_steps`: also import each pipeline's steps and row model and check its DAG
    (bootstrap, consumers and `ingest try` refuse to start on a broken pipeline).
    """
    from ingest.pipelines import PipelineConfigError, load_pipelines

    settings = get_settings()
    try:
        pipelines = load_pipelines(settings.pipelines_file)
    except PipelineConfigError as exc:
        raise fail(str(exc), 2)
    unknown = set(names or ()) - set(pipelines)
    if unknown:
        raise fail(f"unknown pipeline(s) {', '.join(sorted(unknown))}; known: {', '.join(pipelines)}", 2)
    chosen = [p for name, p in pipelines.items() if not names or name in names]
    if check_steps:
        from ingest.steps import load_program

        try:
            for pipeline in chosen:
                load_program(pipeline, settings.pipelines_file)
        except PipelineConfigError as exc:
            raise fail(str(exc), 2)
    return chosen


def replay_id() -> str:
    """Names one replay: in the retried runs' state message, in each re-driven message's headers."""
    return uuid.uuid4().hex[:12]


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """Yield `update(done, total, note)`: a bar on stderr if it is a terminal, else a log line every 5 s."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        last = [time.monotonic()]  # short work needs no progress lines: the summary follows

        def log_line(done: int, total: int, note: str) -> None:
            if time.monotonic() - last[0] >= 5:
                last[0] = time.monotonic()
                log.info("%s: %d of %d%s", label, done, total, f" ({note})" if note else "")

        yield log_line
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None, note="")
        yield lambda done, total, note: bar.update(task, completed=done, total=total, note=note)
