"""`ingest health`: do the services this host depends on answer? An exit code, for Docker,
supervisord event listeners and monitors; one line per service, for people."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aio_pika
import psycopg

from ingest.bootstrap import prefect_health
from ingest.settings import Settings


def _rabbitmq(settings: Settings, timeout: float) -> str | None:
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # its error is in our line already

    async def connect() -> None:
        connection = await aio_pika.connect(settings.amqp_url, timeout=timeout)
        await connection.close()

    asyncio.run(connect())
    return None


def _postgresql(settings: Settings, timeout: float) -> str | None:
    with psycopg.connect(settings.database_url, connect_timeout=max(1, int(timeout))) as conn:
        conn.execute("SELECT 1")
    return None


CHECKS: dict[str, Callable[[Settings, float], str | None]] = {
    "rabbitmq": _rabbitmq, "postgresql": _postgresql, "prefect-api": prefect_health,
}


def check(settings: Settings, timeout: float) -> list[tuple[str, str | None, float]]:
    """(service, error or None, seconds) for each service, in order."""
    results = []
    for name, probe in CHECKS.items():
        started = time.monotonic()
        try:
            error = probe(settings, timeout)
        except Exception as exc:  # unreachable, refused, bad credentials: all mean unhealthy
            error = f"{type(exc).__name__}: {exc}"
        results.append((name, error, time.monotonic() - started))
    return results
