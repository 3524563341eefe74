"""Running the stack: `ingest up` (supervisord in the foreground) and its programs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest import bootstrap, db
from ingest.pipelines import Pipeline
from ingest.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
PREFECT_STARTUP_SECONDS = 180
# flows/forkserver.py reads it; named here too so this package does not import flows.
FORK_SERVER_SOCKET_ENV = "INGEST_FLOW_RUN_SOCKET"
FORK_SERVER_STARTUP_SECONDS = 30


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
        bootstrap.wait_for_prefect(settings, PREFECT_STARTUP_SECONDS)
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
    db.ensure_database(settings.prefect_database_url)
    os.environ.update(settings.prefect_environment())
    os.execv(BIN / "prefect", ["prefect", "server", "start",
                              "--host", settings.prefect_bind_host, "--port", str(settings.prefect_port)])


def exec_prefect_worker(settings: Settings) -> None:
    bootstrap.wait_for_prefect(settings, PREFECT_STARTUP_SECONDS)
    os.environ.update(settings.prefect_environment())
    # Deployments run `ingest-flow-run`, found on the PATH the worker hands its flow runs.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if settings.warm_flow_runs:
        os.environ[FORK_SERVER_SOCKET_ENV] = start_fork_server(settings)
    os.execv(BIN / "prefect", ["prefect", "worker", "start", "--pool", settings.work_pool, "--type", "process",
                              "--limit", str(settings.worker_flow_runs),
                              "--name", f"ingest-worker-{socket.gethostname()}-{os.getpid()}"])


def start_fork_server(settings: Settings) -> str:
    """Start the fork server of warm flow-run processes (flows/forkserver.py); return its socket path.

    It is our child, and stays one when we exec the worker (exec keeps the pid); it exits
    when the worker does. If it is not up in time, flow runs start cold: slower, not broken.
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    path = settings.run_dir / f"flow-runs-{socket.gethostname()}-{os.getpid()}.sock"
    if len(str(path)) > 100:  # the limit of a unix socket's path
        path = Path(tempfile.gettempdir()) / f"ingest-flow-runs-{os.getpid()}.sock"
    subprocess.Popen([sys.executable, "-m", "flows.forkserver", "serve", str(path)])
    deadline = time.monotonic() + FORK_SERVER_STARTUP_SECONDS
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not path.exists():
        log.warning("fork server not ready after %ss: flow runs start cold until it is", FORK_SERVER_STARTUP_SECONDS)
    return str(path)
