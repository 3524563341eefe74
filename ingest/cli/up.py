"""Running the stack: `ingest up` (supervisord in the foreground), `ingest ctl`
(supervisorctl), and the programs of supervisord.conf: `ingest server`, `ingest worker`,
`ingest consumer`."""

from __future__ import annotations

import asyncio
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
from ingest.cli.health import STARTUP_SECONDS, wait_for, wait_for_prefect
from ingest.pipelines import Pipeline
from ingest.settings import PROJECT_ROOT, ROLES, Settings, get_settings

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent

# The program of supervisord.conf each role runs. The same file serves every host: `ingest up`
# gives the programs of the roles a host does not have no process (numprocs 0).
PROGRAMS = {"server": "prefect-server", "worker": "prefect-worker", "consumer": "consumer"}


def up() -> None:
    """Bootstrap, then run this host's programs under supervisord, in the foreground.

    INGEST_ROLES (comma-separated; default all) chooses what the host runs.
    server: creates the databases, migrates, runs the Prefect server, then
    registers the work pool and deployments once it answers. worker: Prefect
    workers (with their fork server); they wait for the API and the work pool.
    consumer: waits for the migrated database, declares the queues, runs the
    consumers. Ctrl-C or SIGTERM stops everything (consumers first).
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
    run_prefect_worker(get_settings())


def consumer(pipeline: PipelineOption = None) -> None:
    """Consume the pipelines' queues until SIGTERM (a program of supervisord.conf)."""
    from consumers.consumer import run

    setup_logging()
    run(get_settings(), chosen_pipelines(pipeline, check_steps=True))


def program_processes(settings: Settings) -> dict[str, int]:
    """How many processes of each program of supervisord.conf this host runs (0: not its role)."""
    wanted = {"server": 1, "worker": settings.workers, "consumer": settings.consumers}
    return {program: wanted[role] if role in settings.roles else 0 for role, program in PROGRAMS.items()}


def stack_environment(settings: Settings) -> dict[str, str]:
    """What supervisord.conf expands, plus the Prefect settings every program shares."""
    return {
        **os.environ,
        **settings.prefect_environment(),
        # NUMPROCS_PREFECT_SERVER, NUMPROCS_PREFECT_WORKER, NUMPROCS_CONSUMER
        **{f"NUMPROCS_{program.upper().replace('-', '_')}": str(n) for program, n in program_processes(settings).items()},
        "INGEST_RUN_DIR": str(settings.run_dir),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_stack(settings: Settings, pipelines: list[Pipeline]) -> int:
    """Bootstrap what the host's roles may, start supervisord, finish the bootstrap once Prefect
    answers (role server); return supervisord's exit code."""
    roles = settings.roles
    # Our Prefect server could not bind a port already taken and would stop, while the worker
    # and consumers went on with whatever answers there (another stack's server): refuse.
    if "server" in roles and port_taken(settings.prefect_bind_host, settings.prefect_port):
        holder = port_holder(settings.prefect_port) or "a process this user cannot see"
        raise fail(f"port {settings.prefect_port} of INGEST_PREFECT_API_URL ({settings.prefect_api_url}) is "
                   f"already in use on this host, by {holder}: the Prefect server cannot listen there. Stop that "
                   "process, or set INGEST_PREFECT_API_URL to a free port")
    log.info("roles %s: programs %s", ",".join(r for r in ROLES if r in roles),
             ", ".join(f"{program} x{n}" for program, n in program_processes(settings).items() if n))
    with bootstrap.reported():
        for step in bootstrap.before_programs(roles):
            step(settings, pipelines)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    # A session of its own: Ctrl-C reaches only us, and we stop supervisord in order.
    supervisord = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(PROJECT_ROOT / "supervisord.conf")],
        env=stack_environment(settings),
        start_new_session=True,
    )

    bootstrapping = True

    def stop(signum, _frame) -> None:
        log.info("%s: stopping the stack", signal.Signals(signum).name)
        supervisord.send_signal(signal.SIGTERM)
        if bootstrapping:
            raise StoppedDuringBootstrap  # else it would go on waiting for a server that is stopping

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for step in bootstrap.once_programs_run(roles):
            step(settings, pipelines)
        log.info("stack up: Prefect UI at %s", settings.prefect_api_url.removesuffix("/api"))
    except StoppedDuringBootstrap:
        log.warning("stopped before the bootstrap against Prefect finished: the next `ingest up` completes it")
    except Exception as exc:
        if supervisord.poll() is None:
            log.error("bootstrap against Prefect failed, stopping: %s", exc)
            supervisord.send_signal(signal.SIGTERM)
    finally:
        bootstrapping = False
    return supervisord.wait()


class StoppedDuringBootstrap(BaseException):
    """SIGTERM or Ctrl-C while `ingest up` still registers with Prefect. A BaseException, so
    that the retries of a bootstrap step (which catch Exception) do not swallow it."""


def exec_supervisorctl(settings: Settings, args: list[str]) -> None:
    os.execve(BIN / "supervisorctl", ["supervisorctl", "-c", str(PROJECT_ROOT / "supervisord.conf"), *args],
              stack_environment(settings))


def exec_prefect_server(settings: Settings) -> None:
    from ingest import db

    db.ensure_database(settings.prefect_database_url)
    os.environ.update(settings.prefect_environment())
    os.execv(BIN / "prefect", ["prefect", "server", "start",
                              "--host", settings.prefect_bind_host, "--port", str(settings.prefect_port)])


def run_prefect_worker(settings: Settings) -> None:
    from flows import forkserver

    # On another host than the server, or started beside it: its pool exists once the server's
    # bootstrap made it (the worker creates none of its own).
    wait_for_prefect(settings, STARTUP_SECONDS)
    wait_for("work-pool", settings, STARTUP_SECONDS, f"work pool {settings.work_pool!r}")
    os.environ.update(settings.prefect_environment())
    # Deployments run `ingest-flow-run`, found on the PATH the worker hands its flow runs.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if settings.warm_flow_runs:
        os.environ[forkserver.SOCKET_ENV] = forkserver.start(settings.run_dir)
    # Imported only now: Prefect reads its settings from the environment set above.
    from flows.worker import serve

    # `prefect worker start`, plus a wake-up by PostgreSQL for each new flow run (flows/worker.py).
    asyncio.run(serve(f"ingest-worker-{socket.gethostname()}-{os.getpid()}", settings.work_pool,
                      settings.worker_flow_runs, settings.database_url))
