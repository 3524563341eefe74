"""`ingest up` when the Prefect API's port is taken on this host: another Prefect server there
(here, something answering its health check) made our server stop at once for want of the
port, while `ingest up` said "stack up" and the worker and consumers used the other server.
It must refuse at once, naming the port and the process that holds it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fixtures.services import AMQP_URL, create_database, delete_queues, drop_database
from tests.fixtures.stack import INGEST, up_environment


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.fixture
def other_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_ingest_up_refuses_a_prefect_port_already_in_use(other_server, ingest_database, tmp_path):
    pipeline = f"up{uuid.uuid4().hex[:8]}"
    (tmp_path / "pipelines.toml").write_text(f"[pipelines.{pipeline}]\nbackfill_cron = \"\"\n")
    prefect_database = create_database("prefect_up_test")  # only touched if `ingest up` went on
    env = up_environment(tmp_path, f"http://127.0.0.1:{other_server}/api", ingest_database, prefect_database)
    up = subprocess.Popen([INGEST, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        output, _ = up.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        output, _ = up.communicate()
        pytest.fail(f"`ingest up` went on with port {other_server} taken:\n{output.decode(errors='replace')[-3000:]}")
    finally:
        asyncio.run(delete_queues([pipeline, f"{pipeline}.dlq"]))
        drop_database(prefect_database)
    text = output.decode(errors="replace")
    assert up.returncode == 1, text
    assert f"port {other_server} of INGEST_PREFECT_API_URL" in text and "already in use" in text, text
    assert f"by pid {os.getpid()} (" in text, text  # this test's process holds it
    assert "stack up" not in text
