"""The `ingest` app: every command, in the order `ingest --help` lists them.

Each command lives in the module of its group (publish, bootstrap, up, backfill, status,
health, develop, runs, dlq); this module only puts them together.
"""

from __future__ import annotations

import os

import typer
from pydantic import ValidationError

from ingest.cli.common import fail
from ingest.settings import get_settings


def _prefect_environment() -> dict[str, str]:
    try:
        return get_settings().prefect_environment()
    except ValidationError as exc:  # a bad INGEST_* variable: one line each, before any command runs
        for error in exc.errors():
            fail(f"INGEST_{str(error['loc'][0]).upper()}: {error['msg'].removeprefix('Value error, ')}")
        raise SystemExit(2)


# Prefect reads its settings from the environment when first imported: derive them from
# INGEST_* before anything imports Prefect.
os.environ.update(_prefect_environment())

from ingest.cli import backfill, bootstrap, develop, dlq, health, publish, runs, status, up  # noqa: E402



def _typer(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


app = _typer("Event-driven ingestion: RabbitMQ -> Prefect flow runs -> PostgreSQL.")
app.command()(publish.schema)
app.command()(bootstrap.bootstrap)
app.command()(up.up)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(up.ctl)
app.command()(up.server)
app.command()(up.worker)
app.command()(up.consumer)
app.command()(publish.publish)
app.command()(backfill.backfill)
app.command()(status.status)
app.command()(health.health)
app.command()(develop.new)
app.command("try")(develop.try_)
app.command()(develop.graph)

replay_app = _typer("Process again what failed: flow runs in bulk (runs), dead letters (dlq).")
replay_app.command()(runs.runs)
replay_app.command()(dlq.dlq)
app.add_typer(replay_app, name="replay")

if __name__ == "__main__":
    app()
