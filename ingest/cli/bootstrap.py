"""`ingest bootstrap`: everything the system needs, created idempotently; and which part of
it `ingest up` runs for each role of its host.

Storage and queues need only PostgreSQL and RabbitMQ; the work pool and deployments need
the Prefect API, so `ingest up` (ingest/cli/up.py) runs them once its server answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from ingest.cli.common import chosen_pipelines, fail, setup_logging
from ingest.cli.health import STARTUP_SECONDS, wait_for, wait_for_prefect
from ingest.pipelines import Pipeline
from ingest.settings import Settings, get_settings

log = logging.getLogger(__name__)


def bootstrap(
    skip_prefect: Annotated[bool, typer.Option(help="Only databases, migrations and queues.")] = False,
    prefect_only: Annotated[
        bool, typer.Option(help="Only the work pool and deployments (CI/CD: needs only the Prefect API).")
    ] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the Prefect API to answer.")] = 0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the migrations and sink-table DDL it would run; change nothing.")
    ] = False,
) -> None:
    """Create databases, run migrations, declare queues, create the work pool and deployments.

    Idempotent: running it again changes nothing. Sink tables follow their row models:
    new optional fields add columns; a changed type or key, or a new required field, is refused.
    """
    if skip_prefect and prefect_only:
        raise fail("--skip-prefect and --prefect-only exclude each other", 2)
    setup_logging()
    settings, pipelines = get_settings(), chosen_pipelines(check_steps=True)
    with reported():
        if dry_run:
            for line in planned_storage(settings, pipelines):
                typer.echo(line)
            typer.echo("dry run: nothing was changed")
            return
        if not prefect_only:
            prepare_storage(settings, pipelines)
            declare_queues(settings, pipelines)
        if not skip_prefect:
            wait_for_prefect(settings, wait or 5)
            register_deployments(settings, pipelines)
    typer.echo("bootstrap complete")


@contextmanager
def reported() -> Iterator[None]:
    """A failed bootstrap step as one error line and exit 1, not a traceback."""
    from ingest.db import DatabaseUnavailable, MigrationError
    from ingest.sinks import SinkSchemaError

    try:
        yield
    except (DatabaseUnavailable, MigrationError, SinkSchemaError, TimeoutError, OSError) as exc:
        raise fail(str(exc))
    except Exception as exc:  # e.g. a queue declared with other arguments
        raise fail(f"{type(exc).__name__}: {exc}")


Step = Callable[[Settings, list[Pipeline]], None]


def before_programs(roles: frozenset[str]) -> list[Step]:
    """What `ingest up` runs for these roles before supervisord starts their programs, in order.

    Only the server migrates; a consumer waits for the migrated database and declares the
    queues its consumers read; a worker has nothing to prepare (its program waits for the
    Prefect API and the work pool).
    """
    steps: list[Step] = []
    if "server" in roles:
        steps.append(prepare_storage)
    if "consumer" in roles:
        steps += [wait_for_storage, declare_queues]
    return steps


def once_programs_run(roles: frozenset[str]) -> list[Step]:
    """What `ingest up` runs for these roles once supervisord has started their programs."""
    return [register_with_prefect] if "server" in roles else []


def prepare_storage(settings: Settings, pipelines: list[Pipeline]) -> None:
    from ingest import db, sinks
    from ingest.steps import load_program

    for url in (settings.database_url, settings.prefect_database_url):
        if db.ensure_database(url):
            log.info("created database %s", db.redact(url))
    with db.connect(settings.database_url, autocommit=True) as conn:
        applied = db.migrate(conn)
        log.info("migrations: %s", ", ".join(applied) if applied else "up to date")
        for pipeline in pipelines:
            sink = load_program(pipeline, settings.pipelines_file).sink
            for statement in sinks.ensure(conn, sink):
                log.info("sink %s of %s: %s", sink.table, pipeline.name, statement.splitlines()[0])
        log.info("sink tables: %s", ", ".join(sorted({p.sink_table for p in pipelines})))


def wait_for_storage(settings: Settings, pipelines: list[Pipeline]) -> None:
    """Wait until the ingest database answers with every migration applied (by a host with role server)."""
    from ingest.db import redact

    wait_for("postgresql", settings, STARTUP_SECONDS, f"the ingest database {redact(settings.database_url)}")
    log.info("ingest database migrated")


def planned_storage(settings: Settings, pipelines: list[Pipeline]) -> list[str]:
    """What prepare_storage() would do to the ingest database, as SQL comments and DDL."""
    from ingest import db, sinks
    from ingest.steps import load_program

    programs = [load_program(p, settings.pipelines_file) for p in pipelines]
    if not db.database_exists(settings.database_url):
        lines = [f"-- database {db.redact(settings.database_url)} would be created",
                 f"-- migrations to apply: {', '.join(db.migration_names())}"]
        for program in programs:
            lines += [f"-- sink {program.sink.table} of pipeline {program.pipeline.name}: 1 statement(s)",
                      f"{sinks.create_statement(program.sink)};"]
        return lines
    with db.connect(settings.database_url, autocommit=True) as conn:
        pending = db.pending_migrations(conn)
        lines = [f"-- migrations to apply: {', '.join(pending) if pending else 'none'}"]
        for program in programs:
            statements = sinks.plan(conn, program.sink)
            lines.append(f"-- sink {program.sink.table} of pipeline {program.pipeline.name}: "
                         + (f"{len(statements)} statement(s)" if statements else "up to date"))
            lines += [f"{statement};" for statement in statements]
    return lines


def declare_queues(settings: Settings, pipelines: list[Pipeline]) -> None:
    import aio_pika

    from consumers.topology import declare_topology

    async def declare() -> None:
        connection = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": "ingest bootstrap"})
        async with connection:
            await declare_topology(connection, pipelines)

    asyncio.run(declare())
    log.info("topology: exchange ingest, queues %s", ", ".join(f"{p.queue} (+ {p.dlq})" for p in pipelines))


def register_with_prefect(settings: Settings, pipelines: list[Pipeline]) -> None:
    """Once the Prefect server started beside us answers: the work pool and the deployments."""
    wait_for_prefect(settings, STARTUP_SECONDS)
    register_deployments(settings, pipelines)


def register_deployments(settings: Settings, pipelines: list[Pipeline]) -> None:
    from flows.deployments import apply_deployments, ensure_crash_detection, ensure_work_pool

    if asyncio.run(ensure_work_pool(settings.work_pool)):
        log.info("created work pool %s (process)", settings.work_pool)
    if asyncio.run(ensure_crash_detection()):
        log.info("created the automation that crashes flow runs whose host is gone")
    names = asyncio.run(apply_deployments(pipelines, settings.work_pool, settings.pipelines_file))
    log.info("deployments: %s", ", ".join(names))
