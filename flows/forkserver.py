"""Warm flow-run processes: each flow run still gets a process of its own, forked instead of started.

A flow-run process started the usual way (`python -m prefect.engine`) spends about 1.3 s
of CPU importing Prefect and our flows before it does anything; at a few runs a second
that is most of the machine. So `ingest worker` also starts a fork server that imports
all of it once, and the deployments run `ingest-flow-run` instead of
`python -m prefect.engine` (job variable `command`):

    Prefect worker --spawns--> ingest-flow-run (launch(): stdlib only, ~30 ms)
        --unix socket: argv, env, cwd, stdin/stdout/stderr--> fork server (serve())
            --fork--> guardian --fork--> engine: prefect.engine's __main__, as usual

The engine process is what `python -m prefect.engine` would be, with the same
environment, working directory and standard streams. The launcher stands in for it
towards the worker: it forwards SIGTERM/SIGINT to the engine and exits with the engine's
status, so cancellation, crash reporting and supervisord's stop work unchanged. The
guardian waits for the engine and kills it if the launcher dies. Without a fork server
(INGEST_FLOW_RUN_SOCKET unset, or nobody listening) the launcher execs
`python -m prefect.engine` itself: a plain Prefect worker on another host works as well.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path

SOCKET_ENV = "INGEST_FLOW_RUN_SOCKET"
_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# --- the launcher: what the worker starts, kept to the standard library ----------------------


def launch() -> None:
    """Entry point `ingest-flow-run`: run this flow run in a forked, warm process (or a cold one)."""
    path = os.environ.get(SOCKET_ENV)
    # Held until we know whom to forward them to (a cancel right at the start is not lost).
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED_SIGNALS)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path:
            raise OSError(f"{SOCKET_ENV} is not set")
        conn.connect(path)
        request = json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        conn.sendmsg([_HEADER.pack(len(request)), request],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        engine_pid = _STATUS.unpack(_receive(conn, _STATUS.size))[0]
    except OSError as exc:
        conn.close()
        print(f"ingest-flow-run: no fork server ({exc}); starting a cold engine process", file=sys.stderr)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)  # a blocked mask survives exec
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])

    for sig in _FORWARDED_SIGNALS:  # the worker cancels or stops the run through us
        signal.signal(sig, lambda signum, _frame: _kill_quietly(engine_pid, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)
    try:
        status = _STATUS.unpack(_receive(conn, _STATUS.size))[0]
    except OSError:
        status = 1  # the guardian is gone: the fork server died with the run
    _exit_like(status)


def _receive(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the fork server closed the connection")
        data += chunk
    return data


def _kill_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _exit_like(status: int) -> None:
    """Exit with the engine's code, or die of the same signal (a negative status)."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status if status >= 0 else 1)


# --- the fork server ----------------------------------------------------------------------

STARTUP_SECONDS = 30


def start(run_dir: Path) -> str:
    """Start a fork server (`ingest worker` does, before it execs the Prefect worker); return its socket path.

    It is the caller's child, and stays one when the caller execs the worker (exec keeps
    the pid); it exits when the worker does. If it is not up in time, flow runs start
    cold: slower, not broken.
    """
    import logging
    import subprocess
    import tempfile

    from ingest.waiting import TimedOut, poll

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"flow-runs-{socket.gethostname()}-{os.getpid()}.sock"
    if len(str(path)) > 100:  # the limit of a unix socket's path
        path = Path(tempfile.gettempdir()) / f"ingest-flow-runs-{os.getpid()}.sock"
    subprocess.Popen([sys.executable, "-m", "flows.forkserver", "serve", str(path)])
    try:
        poll(path.exists, timeout=STARTUP_SECONDS, interval=0.1, what="the fork server's socket")
    except TimedOut:
        logging.getLogger(__name__).warning(
            "fork server not ready after %ss: flow runs start cold until it is", STARTUP_SECONDS)
    return str(path)



def serve(path: str) -> None:
    """Import the flow-run code once, then fork an engine process per launcher connection."""
    import threading

    # What a flow-run process imports: the engine and our flows (never the AMQP side).
    import prefect.engine  # noqa: F401
    import prefect.flow_engine  # noqa: F401

    import flows.backfill  # noqa: F401
    import flows.ingest  # noqa: F401
    import flows.maintenance  # noqa: F401

    if threading.active_count() != 1:  # forking a process with threads could copy a held lock
        raise SystemExit(f"fork server: {threading.active_count()} threads after imports; refusing to fork")
    parent = os.getppid()
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # guardians are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fork server ready on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        while os.getppid() == parent:  # the worker that started us is gone: so are we
            if not select.select([listener], [], [], 1.0)[0]:
                continue
            conn, _ = listener.accept()
            try:
                request, fds = _read_request(conn)
            except (OSError, ValueError) as exc:
                print(f"fork server: bad request: {exc}", file=sys.stderr, flush=True)
                conn.close()
                continue
            if os.fork() == 0:
                listener.close()
                _guard(conn, request, fds)  # never returns
            conn.close()
            for fd in fds:
                os.close(fd)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(_HEADER.size, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(data) != _HEADER.size or len(fds) != 3:
        raise ValueError("expected a length header and three file descriptors")
    return json.loads(_receive(conn, _HEADER.unpack(data)[0])), list(fds)


def _guard(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """The guardian: fork the engine, report its pid and status; kill it if the launcher dies."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    engine = os.fork()
    if engine == 0:
        conn.close()
        _run_engine(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    status = 1
    try:
        conn.sendall(_STATUS.pack(engine))
        while True:
            pid, wait_status = os.waitpid(engine, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(wait_status)
                break
            if select.select([conn], [], [], 0.2)[0] and not conn.recv(1):
                os.kill(engine, signal.SIGKILL)  # the launcher died: so does its run, as without us
        conn.sendall(_STATUS.pack(status))
    except OSError:
        pass
    os._exit(0)


def _run_engine(request: dict, fds: list[int]) -> None:
    """Become `python -m prefect.engine ARGS` in the launcher's environment, directory and streams."""
    import atexit
    import random
    import runpy
    import warnings

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    random.seed()  # not the same random sequence in every run

    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    sys.argv = ["prefect.engine", *request["argv"]]
    code: int | str | None = 0
    try:
        # Settings were read when the fork server imported Prefect: read them again from
        # this run's environment, as Prefect's own subprocess runner does.
        with SettingsContext(profile=get_settings_context().profile, settings=Settings()), warnings.catch_warnings():
            # runpy warns that prefect.engine is imported already: on purpose, that is the point.
            warnings.filterwarnings("ignore", "'prefect.engine' found in sys.modules", RuntimeWarning)
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # Prefect flushes its logs and events at exit
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        raise SystemExit("usage: python -m flows.forkserver serve SOCKET_PATH")
    serve(sys.argv[2])
