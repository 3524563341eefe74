"""Running the stack: `ingest up` (supervisord in the foreground), `ingest ctl`
(supervisorctl), and the programs of supervisord.conf: `ingest server`, `ingest worker`,
`ingest consumer`."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import typer

from ingest.cli import bootstrap
from ingest.cli.common import PipelineOption, chosen_pipelines, fail, setup_logging
from ingest.cli.ports import port_holder, port_taken
from ingest.cli.health import wait_for_prefect
from ingest.pipelines import Pipeline
from ingest.settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
PREFECT_STARTUP_SECONDS = 180


def up() -> None:
    """Bootstrap, then run the Prefect server, the worker and the consumers under supervisord.

    Runs in the foreground; Ctrl-C or SIGTERM stops everything (consumers first).
    """
    setup_logging()
    raise typer.Exit(run_stack(get_settings(), chosen_pipelines(check_steps=True)))


def ctl(context: typer.Context) -> None:
    """supervisorctl for the stack `ingest up` runs, e.g. `ingest ctl status`, `ingest ctl restart consumer:*`."""
    exec_supervisorctl(get_settings(), context.args)


def server() -> None:
    """Run the Prefect server on its PostgreSQL database (a program of supervisord.conf)."""
    setup_logging()
    exec_prefect_server(get_settings())


def worker() -> None:
    """Run a Prefect worker on the process work pool (a program of supervisord.conf)."""
    setup_logging()
    exec_prefect_worker(get_settings())


def consumer(pipeline: PipelineOption = None) -> None:
    """Consume the pipelines' queues until SIGTERM (a program of supervisord.conf)."""
    from consumers.consumer import run

    setup_logging()
    run(get_settings(), chosen_pipelines(pipeline, check_steps=True))


def stack_environment(settings: Settings) -> dict[str, str]:
    """What supervisord.conf expands, plus the Prefect settings every program shares."""
    return {
        **os.environ,
        **settings.prefect_environment(),
        "INGEST_CONSUMERS": str(settings.consumers),
        "INGEST_WORKERS": str(settings.workers),
        "INGEST_RUN_DIR": str(settings.run_dir),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_stack(settings: Settings, pipelines: list[Pipeline]) -> int:
    """Bootstrap, start supervisord, register deployments once Prefect answers; return its exit code."""
    # Our Prefect server could not bind a port already taken and would stop, while the worker
    # and consumers went on with whatever answers there (another stack's server): refuse.
    if port_taken(settings.prefect_bind_host, settings.prefect_port):
        holder = port_holder(settings.prefect_port) or "a process this user cannot see"
        raise fail(f"port {settings.prefect_port} of INGEST_PREFECT_API_URL ({settings.prefect_api_url}) is "
                   f"already in use on this host, by {holder}: the Prefect server cannot listen there. Stop that "
                   "process, or set INGEST_PREFECT_API_URL to a free port")
    bootstrap.prepare_storage(settings, pipelines)
    bootstrap.declare_queues(settings, pipelines)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    # A session of its own: Ctrl-C reaches only us, and we stop supervisord in order.
    supervisord = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(PROJECT_ROOT / "supervisord.conf")],
        env=stack_environment(settings),
        start_new_session=True,
    )

    def stop(signum, _frame) -> None:
        log.info("%s: stopping the stack", signal.Signals(signum).name)
        supervisord.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        wait_for_prefect(settings, PREFECT_STARTUP_SECONDS)
        bootstrap.register_deployments(settings, pipelines)
        log.info("stack up: Prefect UI at %s", settings.prefect_api_url.removesuffix("/api"))
    except Exception as exc:
        if supervisord.poll() is None:
            log.error("bootstrap against Prefect failed, stopping: %s", exc)
            supervisord.send_signal(signal.SIGTERM)
    return supervisord.wait()


def exec_supervisorctl(settings: Settings, args: list[str]) -> None:
    os.execve(BIN / "supervisorctl", ["supervisorctl", "-c", str(PROJECT_ROOT / "supervisord.conf"), *args],
              stack_environment(settings))


def exec_prefect_server(settings: Settings) -> None:
    from ingest import db

    db.ensure_database(settings.prefect_database_url)
    os.environ.update(settings.prefect_environment())
    os.execv(BIN / "prefect", ["prefect", "server", "start",
                              "--host", settings.prefect_bind_host, "--port", str(settings.prefect_port)])


def exec_prefect_worker(settings: Settings) -> None:
    from flows import forkserver

    wait_for_prefect(settings, PREFECT_STARTUP_SECONDS)
    os.environ.update(settings.prefect_environment())
    # Deployments run `ingest-flow-run`, found on the PATH the worker hands its flow runs.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if settings.warm_flow_runs:
        os.environ[forkserver.SOCKET_ENV] = forkserver.start(settings.run_dir)
    os.execv(BIN / "prefect", ["prefect", "worker", "start", "--pool", settings.work_pool, "--type", "process",
                              "--limit", str(settings.worker_flow_runs),
                              "--name", f"ingest-worker-{socket.gethostname()}-{os.getpid()}"])
