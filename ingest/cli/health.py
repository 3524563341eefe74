"""`ingest health`: do the services this host depends on answer? An exit code, for Docker,
supervisord event listeners and monitors; one line per service, for people.

Also the Prefect API's health probe that bootstrap and the worker wait on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import typer

from ingest.settings import Settings, get_settings


def health(
    timeout: Annotated[float, typer.Option(help="Seconds each service may take to answer.")] = 5,
) -> None:
    """Check that RabbitMQ, PostgreSQL and the Prefect API answer; exit 1 if any does not."""
    results = check(get_settings(), timeout)
    for name, error, seconds in results:
        typer.echo(f"{name:<12} {'ok' if error is None else 'FAILED: ' + error} ({seconds * 1000:.0f} ms)")
    if any(error is not None for _, error, _ in results):
        raise typer.Exit(1)


def _rabbitmq(settings: Settings, timeout: float) -> str | None:
    import asyncio
    import logging

    import aio_pika

    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # its error is in our line already

    async def connect() -> None:
        connection = await aio_pika.connect(settings.amqp_url, timeout=timeout)
        await connection.close()

    asyncio.run(connect())
    return None


def _postgresql(settings: Settings, timeout: float) -> str | None:
    import psycopg

    with psycopg.connect(settings.database_url, connect_timeout=max(1, int(timeout))) as conn:
        conn.execute("SELECT 1")
    return None


def prefect_health(settings: Settings, timeout: float = 5) -> str | None:
    """Ask the Prefect API's health check once; None if healthy, else what went wrong."""
    import os
    import ssl

    import httpx

    url = settings.prefect_api_url.rstrip("/") + "/health"
    # Prefect answers /health without credentials, but a proxy in front of it (nginx) does not.
    secret = settings.prefect_auth_string.get_secret_value() if settings.prefect_auth_string else ""
    auth = httpx.BasicAuth(*secret.split(":", 1)) if ":" in secret else None
    # Trust what Prefect's own client trusts (e.g. the proxy's self-signed certificate).
    cafile = os.environ.get("PREFECT_API_SSL_CERT_FILE")
    verify = ssl.create_default_context(cafile=cafile) if cafile else True
    try:
        status = httpx.get(url, timeout=timeout, auth=auth, verify=verify).status_code
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if status == 200 else f"health check answered HTTP {status}"


def wait_for_prefect(settings: Settings, timeout: float) -> None:
    """Block until the Prefect API answers its health check, or raise TimeoutError."""
    from ingest.waiting import TimedOut, poll

    try:
        poll(lambda: prefect_health(settings), until=lambda error: error is None, timeout=timeout, interval=1,
             what="the Prefect API's health check")
    except TimedOut as exc:
        raise TimeoutError(
            f"Prefect API {settings.prefect_api_url} not healthy after {timeout:.0f}s: {exc.last}"
        ) from None


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
