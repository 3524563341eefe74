"""`ingest bootstrap`: everything the system needs, created idempotently.

Storage and queues need only PostgreSQL and RabbitMQ; the work pool and deployments need
the Prefect API, so `ingest up` runs them once its server answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time

import httpx

from ingest import db
from ingest.pipelines import Pipeline
from ingest.settings import Settings

log = logging.getLogger(__name__)


def prepare_storage(settings: Settings, pipelines: list[Pipeline]) -> None:
    for url in (settings.database_url, settings.prefect_database_url):
        if db.ensure_database(url):
            log.info("created database %s", db.redact(url))
    with db.connect(settings.database_url, autocommit=True) as conn:
        applied = db.migrate(conn)
        log.info("migrations: %s", ", ".join(applied) if applied else "up to date")
        for table in sorted({p.sink_table for p in pipelines}):
            db.ensure_sink_table(conn, table)
        log.info("sink tables: %s", ", ".join(sorted({p.sink_table for p in pipelines})))


def declare_queues(settings: Settings, pipelines: list[Pipeline]) -> None:
    import aio_pika

    from consumers.topology import declare_topology

    async def declare() -> None:
        connection = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": "ingest bootstrap"})
        async with connection:
            await declare_topology(connection, pipelines)

    asyncio.run(declare())
    log.info("topology: exchange ingest, queues %s", ", ".join(f"{p.queue} (+ {p.dlq})" for p in pipelines))


def prefect_health(settings: Settings, timeout: float = 5) -> str | None:
    """Ask the Prefect API's health check once; None if healthy, else what went wrong."""
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
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if (last_error := prefect_health(settings)) is None:
            return
        time.sleep(1)
    raise TimeoutError(f"Prefect API {settings.prefect_api_url} not healthy after {timeout:.0f}s: {last_error}")


def register_deployments(settings: Settings, pipelines: list[Pipeline]) -> None:
    from flows.deployments import apply_deployments, ensure_work_pool

    if asyncio.run(ensure_work_pool(settings.work_pool)):
        log.info("created work pool %s (process)", settings.work_pool)
    names = asyncio.run(apply_deployments(pipelines, settings.work_pool))
    log.info("deployments: %s", ", ".join(names))
