"""`ingest health`: does what this host's roles need answer? An exit code, for the container's
HEALTHCHECK, supervisord event listeners and monitors; one line per check, for people.

Also the probes that `ingest up` and the worker wait on before they go on: each wait is a
health check asked again until it passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Optional

import typer

from ingest.settings import ROLES, Settings, get_settings

Probe = Callable[[Settings, float], Optional[str]]  # None if healthy, else what is wrong

# How long `ingest up` and a worker wait for what a program beside them or another host
# provides (the Prefect API, the work pool, the migrated database) before they give up.
STARTUP_SECONDS = 180


def health(
    timeout: Annotated[float, typer.Option(help="Seconds each check may take (they run at once).")] = 5,
) -> None:
    """Check what this host's roles need (INGEST_ROLES); exit 1 if anything fails.

    server: Prefect's database (prefect-db), the Prefect API (prefect-api).
    worker: the ingest database, migrated (postgresql), the Prefect API,
    the work pool (work-pool). consumer: RabbitMQ (rabbitmq), the ingest
    database, migrated, and the Prefect API. One line per check.
    """
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


def _ingest_database(settings: Settings, timeout: float) -> str | None:
    """The ingest database answers and has every migration of this code (the server role applies them)."""
    import psycopg

    from ingest.db import pending_migrations

    with psycopg.connect(settings.database_url, connect_timeout=max(1, int(timeout))) as conn:
        pending = pending_migrations(conn)
    if pending:
        return f"migrations not applied yet: {', '.join(pending)} (`ingest up` applies them on a host with role server)"
    return None


def _prefect_database(settings: Settings, timeout: float) -> str | None:
    import psycopg

    with psycopg.connect(settings.prefect_database_url, connect_timeout=max(1, int(timeout))) as conn:
        conn.execute("SELECT 1")
    return None


def _prefect_status(settings: Settings, path: str, timeout: float) -> int:
    """The HTTP status of GET `path` of the Prefect API, called as Prefect's clients call it."""
    import ssl

    import httpx

    # Prefect answers /health without credentials, but a proxy in front of it (nginx) does not.
    secret = settings.prefect_auth_string.get_secret_value() if settings.prefect_auth_string else ""
    auth = httpx.BasicAuth(*secret.split(":", 1)) if ":" in secret else None
    # Trust what Prefect's own client trusts (e.g. the proxy's self-signed certificate).
    verify = ssl.create_default_context(cafile=settings.prefect_ca_file) if settings.prefect_ca_file else True
    return httpx.get(settings.prefect_api_url.rstrip("/") + path, timeout=timeout, auth=auth, verify=verify).status_code


def _prefect_api(settings: Settings, timeout: float) -> str | None:
    """The Prefect API answers its health check."""
    status = _prefect_status(settings, "/health", timeout)
    return None if status == 200 else f"health check answered HTTP {status}"


def _work_pool(settings: Settings, timeout: float) -> str | None:
    """The work pool the worker polls exists (the server role's `ingest up` creates it)."""
    from urllib.parse import quote

    status = _prefect_status(settings, f"/work_pools/{quote(settings.work_pool, safe='')}", timeout)
    if status == 404:
        return f"work pool {settings.work_pool!r} not found (HTTP 404; `ingest up` creates it on a host with role server)"
    return None if status == 200 else f"reading work pool {settings.work_pool!r} answered HTTP {status}"


# Each check and the roles that need it, in the order they are shown.
CHECKS: dict[str, tuple[Probe, frozenset[str]]] = {
    "rabbitmq": (_rabbitmq, frozenset({"consumer"})),
    "postgresql": (_ingest_database, frozenset({"worker", "consumer"})),
    "prefect-db": (_prefect_database, frozenset({"server"})),
    "prefect-api": (_prefect_api, frozenset(ROLES)),
    "work-pool": (_work_pool, frozenset({"worker"})),
}


def checks_for(roles: frozenset[str]) -> list[str]:
    """The checks a host with these roles runs, in order."""
    return [name for name, (_, needed_by) in CHECKS.items() if needed_by & roles]


def _answer(name: str, settings: Settings, timeout: float) -> str | None:
    try:
        error = CHECKS[name][0](settings, timeout)
    except Exception as exc:  # unreachable, refused, bad credentials: all mean unhealthy
        error = f"{type(exc).__name__}: {exc}"
    return None if error is None else " ".join(error.split())  # one line (libpq's errors have several)


def _timed(name: str, settings: Settings, timeout: float) -> tuple[str, str | None, float]:
    started = time.monotonic()
    error = _answer(name, settings, timeout)
    return name, error, time.monotonic() - started


def check(settings: Settings, timeout: float) -> list[tuple[str, str | None, float]]:
    """(check, error or None, seconds) for each check the host's roles need, in order.

    They run at once, so that the whole takes about `timeout` at most (a container's
    HEALTHCHECK has a time limit of its own).
    """
    names = checks_for(settings.roles)
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda name: _timed(name, settings, timeout), names))


def wait_for(name: str, settings: Settings, timeout: float, what: str | None = None) -> None:
    """Ask check `name` every second until it passes, or raise TimeoutError with its last answer."""
    from ingest.waiting import TimedOut, poll

    what = what or f"the {name} check"
    try:
        poll(lambda: _answer(name, settings, 5), until=lambda error: error is None, timeout=timeout, interval=1,
             what=what)
    except TimedOut as exc:
        raise TimeoutError(f"{what} not healthy after {timeout:.0f}s: {exc.last}") from None


def wait_for_prefect(settings: Settings, timeout: float) -> None:
    """Block until the Prefect API answers its health check, or raise TimeoutError."""
    wait_for("prefect-api", settings, timeout, f"Prefect API {settings.prefect_api_url}")
