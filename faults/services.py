"""Private PostgreSQL and RabbitMQ instances the fault suite starts, restarts and removes.

The suite restarts the broker and the database on purpose, so it never uses the shared
ones: each instance here lives in its own directory, on free ports, and is removed at the
end. Binaries come from the distribution's packages (Debian's layout, as in the image
and in CI).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx

from ingest.waiting import TimedOut, poll
from tests.fixtures.stack import free_port


def _binary(name: str, candidates: list[str]) -> str:
    for pattern in candidates:
        if found := sorted(glob.glob(pattern)):
            return found[-1]  # the highest version
    if path := shutil.which(name):
        return path
    raise FileNotFoundError(f"{name} not found (install the distribution's package)")


class PrivatePostgres:
    """A PostgreSQL cluster of its own: initdb into a directory, trust auth on 127.0.0.1.

    `listen`: the addresses it listens on (127.0.0.1 always: the trusted one); `hba`: lines
    added to pg_hba.conf, e.g. password logins from a container network's subnet.
    """

    def __init__(self, home: Path, listen: tuple[str, ...] = (), hba: tuple[str, ...] = ()):
        self.bin = Path(_binary("pg_ctl", ["/usr/lib/postgresql/*/bin/pg_ctl"])).parent
        self.dir = home / "postgres"
        self.data, self.log = self.dir / "data", self.dir / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        # PostgreSQL refuses to run as root: the cluster belongs to the postgres user then.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.listen, self.hba = ",".join(("127.0.0.1", *listen)), hba

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> "PrivatePostgres":
        if not self.data.exists():
            self.dir.mkdir(parents=True)
            if self.user:
                entry = pwd.getpwnam(self.user)
                os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.writelines(f"{line}\n" for line in self.hba)
        # The socket goes into our directory too: the shared server owns the default one.
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses={self.listen} -c max_connections=200")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def remove(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of its own name, ports, data, logs and Erlang cookie (with management).

    `listen`: the address AMQP listens on (management stays on 127.0.0.1, where guest may log in).
    """

    def __init__(self, home: Path, listen: str = "127.0.0.1"):
        self.server = _binary("rabbitmq-server", ["/usr/lib/rabbitmq/bin/rabbitmq-server"])
        self.ctl = _binary("rabbitmqctl", ["/usr/lib/rabbitmq/bin/rabbitmqctl"])
        self.dir = home / "rabbitmq"
        self.node = f"ingest-faults-{uuid.uuid4().hex[:6]}@localhost"
        self.port, self.management_port = free_port(), free_port()
        self.host = listen
        self.url = f"amqp://guest:guest@{listen}:{self.port}/"
        self.management_url = f"http://127.0.0.1:{self.management_port}"
        self.process: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie: ours, not the shared node's
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": listen,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
        }

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq-env.conf").write_text("")  # not the system's, which names the shared node
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
            # Queue depths fresh enough to tell when a queue has drained.
            "collect_statistics_interval = 1000\n"
        )

    def start(self) -> "PrivateRabbit":
        if not (self.dir / "rabbitmq.conf").exists():
            self._write_config()
        with open(self.dir / "server.log", "ab") as log:
            self.process = subprocess.Popen([self.server], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.dir)

        def started() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError("the node exited")
            return self._ctl("await_startup", "--timeout", "10").returncode == 0

        try:
            poll(started, timeout=120, interval=0, what=f"RabbitMQ node {self.node}")
        except (TimedOut, RuntimeError):
            raise RuntimeError(f"RabbitMQ node {self.node} did not start; see {self.dir / 'server.log'}") from None
        return self

    def _ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.ctl, "-n", self.node, *args], env=self.env, capture_output=True, text=True,
                              timeout=180)

    def import_definitions(self, path: Path) -> None:
        """Users and permissions from a definitions file (consumers/rabbitmq_definitions.py)."""
        result = self._ctl("import_definitions", str(path))
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl import_definitions failed: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        """Stop the node as an operator would (rabbitmqctl stop), and wait for its process."""
        if self.process is None or self.process.poll() is not None:
            return
        self._ctl("stop")
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close_connections(self, name_prefix: str) -> int:
        """Close, as the broker, the client connections whose name starts so; return how many."""
        api = f"{self.management_url}/api/connections"
        auth = ("guest", "guest")
        named = [c["name"] for c in httpx.get(api, auth=auth, timeout=10).raise_for_status().json()
                 if str(c.get("client_properties", {}).get("connection_name", "")).startswith(name_prefix)]
        for name in named:
            httpx.delete(f"{api}/{quote(name, safe='')}", auth=auth, headers={"X-Reason": "fault suite"},
                         timeout=10).raise_for_status()
        return len(named)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
