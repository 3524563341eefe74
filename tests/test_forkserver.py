"""The fork server of warm flow-run processes, and the launcher's way back to a cold start.

(Every flow run of the other tests on the real stack goes through it as well.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.fixtures.stack import wait_for

LAUNCHER = str(Path(sys.executable).parent / "ingest-flow-run")


def launch(*args: str, socket_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT__", "INGEST_FLOW_RUN"))}
    if socket_path:
        env["INGEST_FLOW_RUN_SOCKET"] = socket_path
    return subprocess.run([LAUNCHER, *args], env=env, capture_output=True, timeout=120)


def test_engine_runs_forked_with_the_launchers_arguments_and_its_exit_code_comes_back(tmp_path):
    path = tmp_path / "fs.sock"
    server = subprocess.Popen([sys.executable, "-m", "flows.forkserver", "serve", str(path)],
                              stderr=subprocess.PIPE)
    try:
        def listening() -> bool:
            assert server.poll() is None, server.stderr.read().decode()
            return path.exists()

        wait_for(listening, 60, "the fork server's socket", interval=0.1)
        # prefect.engine refuses a flow run id that is not a UUID: exit code 1, its error on our stderr.
        result = launch("not-a-uuid", socket_path=str(path))
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert "Invalid flow run id" in err and "not-a-uuid" in err
        assert "no fork server" not in err
        assert server.poll() is None  # one bad run does not take the server down
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert not path.exists()


def test_without_a_fork_server_the_launcher_starts_a_cold_engine(tmp_path):
    for socket_path in (None, str(tmp_path / "nobody-listens.sock")):
        result = launch("not-a-uuid", socket_path=socket_path)
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert "no fork server" in err and "Invalid flow run id" in err
