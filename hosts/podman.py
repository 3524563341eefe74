"""The podman command line, for one test's network and containers, all removed at the end.

Every container gets the same options: runc (crun, the default runtime of some
distributions, refuses hosts with hybrid cgroups) and explicit limits on open files and
processes within this process's own hard limits (podman's defaults can exceed what a host
allows, and are then refused: `setrlimit ... Operation not permitted`). No healthcheck
timer: podman runs those from systemd, which a CI container lacks; `healthy()` runs the
image's HEALTHCHECK on demand (`podman healthcheck run`), as the timer would.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NOFILE, NPROC = 65536, 8192  # plenty for one host, unless the host allows less


def options() -> list[str]:
    """What every container of the image is run with here (see the module's docstring)."""
    args = ["--health-interval", "disable"]
    for name, kind, cap in (("nofile", resource.RLIMIT_NOFILE, NOFILE), ("nproc", resource.RLIMIT_NPROC, NPROC)):
        hard = resource.getrlimit(kind)[1]
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        args += ["--ulimit", f"{name}={value}:{value}"]
    return args


@dataclass
class Podman:
    """Containers named `<prefix>-<host>` on the network `<prefix>` (subnet of its own, internal:
    no route beyond this machine); `remove()` takes them all away, whatever state they are in."""

    prefix: str
    subnet: str  # e.g. 10.213.0.0/24: the gateway is .1, the address this machine has on it
    containers: list[str] = field(default_factory=list)
    network: str | None = None

    def __post_init__(self) -> None:
        if not shutil.which("podman"):
            raise RuntimeError("podman not found: `make system-deps` installs it (with runc)")

    @property
    def gateway(self) -> str:
        return self.address(1)

    def address(self, host: int) -> str:
        return self.subnet.rsplit(".", 1)[0] + f".{host}"

    def __call__(self, *args: str, check: bool = True, timeout: float = 300,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:2])} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()}")
        return result

    def create_network(self) -> None:
        self("network", "create", "--internal", "--subnet", self.subnet, "--gateway", self.gateway, self.prefix)
        self.network = self.prefix

    def pin_bridge_address(self) -> None:
        """Fix the MAC address of the network's bridge (once a container has made it).

        A Linux bridge whose address was never set takes the lowest of its ports', so it
        changes as containers join and leave (netavark 1.4 does not set it). The containers
        still hold the old one for the gateway in their ARP caches, and what they send to
        the gateway (the database, the broker, nginx) is lost until those entries expire:
        `make image-test` saw the server's database calls time out for 30 s and more as the
        other hosts stopped, at random, since it depends on which port had the lowest MAC.
        Docker sets a bridge's address; this does the same.
        """
        bridge = self("network", "inspect", "--format", "{{.NetworkInterface}}", self.prefix).stdout.strip()
        address = Path(f"/sys/class/net/{bridge}/address").read_text().strip()
        ip = shutil.which("ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "ip"
        subprocess.run([ip, "link", "set", "dev", bridge, "address", address], check=True, capture_output=True)

    def run(self, host: str, image: str, address: int, env: dict[str, str], volumes: tuple[str, ...] = (),
            hosts: dict[str, str] | None = None, entrypoint: list[str] | None = None) -> str:
        """Start host `host` (its hostname) from `image`, detached, at `.address` of the subnet."""
        name = f"{self.prefix}-{host}"
        self.containers.append(name)
        args = ["run", "-d", "--name", name, "--hostname", host, "--network", self.prefix,
                "--ip", self.address(address), *options()]
        for key in env:
            args += ["--env", key]  # values from our environment below: never on a command line
        for volume in volumes:
            args += ["--volume", volume]
        for alias, ip in (hosts or {}).items():
            args += ["--add-host", f"{alias}:{ip}"]
        if entrypoint:
            args += ["--entrypoint", json.dumps(entrypoint)]
        self(*args, image, env=env)
        return name

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", "--format", template, name).stdout.strip()

    def healthy(self, name: str) -> bool:
        return self("healthcheck", "run", name, check=False, timeout=120).returncode == 0

    def uids(self, name: str) -> dict[str, set[int]]:
        """Command -> the uids (real, effective, saved) of the container's processes, read from
        this machine's /proc (the image has no `ps`): all 10001 for our image."""
        found: dict[str, set[int]] = {}
        for line in self("top", name, "hpid", "comm").stdout.splitlines()[1:]:
            pid, comm = line.split(None, 1)
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:  # exited meanwhile
                continue
            uids = next(row.split()[1:4] for row in status.splitlines() if row.startswith("Uid:"))
            found.setdefault(comm.strip(), set()).update(map(int, uids))
        return found

    def stop(self, name: str, grace: int) -> tuple[float, int]:
        """`podman stop` with this grace period: (seconds it took, the container's exit code)."""
        started = time.monotonic()
        self("stop", "--time", str(grace), name, timeout=grace + 60)
        return time.monotonic() - started, int(self.inspect(name, "{{.State.ExitCode}}"))

    def kill(self, name: str) -> None:
        self("kill", name)

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        for name in reversed(self.containers):
            self("rm", "--force", "--time", "0", name, check=False)
        self.containers.clear()
        if self.network:
            self("network", "rm", "--force", self.network, check=False)
            self.network = None
