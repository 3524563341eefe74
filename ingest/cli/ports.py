"""Whether a TCP port is taken on this host, and by which process (for `ingest up`).

The holder is found in /proc (Linux): the listening socket's inode in /proc/net/tcp and
tcp6, then the process with that socket among its open files. Elsewhere, or without the
right to look at other users' processes, the port is still reported, its holder not.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

LISTEN = "0A"  # the state column of /proc/net/tcp


def port_taken(host: str, port: int) -> bool:
    """True if a server binding `host:port` here would find it in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As servers bind (uvicorn too): a port left in TIME_WAIT is free, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holder(port: int, proc: Path = Path("/proc")) -> str | None:
    """`pid N (command line)` of the process listening on `port`, if it can be found."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port, proc)}
    if not inodes:
        return None
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            holds = any(str(fd.readlink()) in inodes for fd in fd_dir.iterdir())
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        if holds:
            pid = fd_dir.parent.name
            try:
                command = " ".join((proc / pid / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
            except OSError:
                command = "?"
            return f"pid {pid} ({command[:200]})"
    return None
