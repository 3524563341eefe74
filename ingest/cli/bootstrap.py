"""`ingest bootstrap`: everything the system needs, created idempotently.

Storage and queues need only PostgreSQL and RabbitMQ; the work pool and deployments need
the Prefect API, so `ingest up` (ingest/cli/up.py) runs them once its server answers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

from ingest.cli.common import chosen_pipelines, fail, setup_logging
from ingest.cli.health import wait_for_prefect
from ingest.pipelines import Pipeline
from ingest.settings import Settings, get_settings

log = logging.getLogger(__name__)


def bootstrap(
    skip_prefect: Annotated[bool, typer.Option(help="Only databases, migrations and queues.")] = False,
    prefect_only: Annotated[
        bool, typer.Option(help="Only the work pool and deployments (CI/CD: needs only the Prefect API).")
    ] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the Prefect API to answer.")] = 0,
) -> None:
    """Create databases, run migrations, declare queues, create the work pool and deployments.

    Idempotent: running it again changes nothing.
    """
    from ingest.db import DatabaseUnavailable

    if skip_prefect and prefect_only:
        raise fail("--skip-prefect and --prefect-only exclude each other", 2)
    setup_logging()
    settings, pipelines = get_settings(), chosen_pipelines()
    try:
        if not prefect_only:
            prepare_storage(settings, pipelines)
            declare_queues(settings, pipelines)
        if not skip_prefect:
            wait_for_prefect(settings, wait or 5)
            register_deployments(settings, pipelines)
    except (DatabaseUnavailable, TimeoutError, OSError) as exc:
        raise fail(str(exc))
    except Exception as exc:  # e.g. a queue declared with other arguments
        raise fail(f"{type(exc).__name__}: {exc}")
    typer.echo("bootstrap complete")


def prepare_storage(settings: Settings, pipelines: list[Pipeline]) -> None:
    from ingest import db

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


def register_deployments(settings: Settings, pipelines: list[Pipeline]) -> None:
    from flows.deployments import apply_deployments, ensure_work_pool

    if asyncio.run(ensure_work_pool(settings.work_pool)):
        log.info("created work pool %s (process)", settings.work_pool)
    names = asyncio.run(apply_deployments(pipelines, settings.work_pool))
    log.info("deployments: %s", ", ".join(names))
