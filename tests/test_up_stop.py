"""`ingest up` stopped while it still waits for its Prefect server to register the work pool
and deployments: it forwarded SIGTERM to supervisord but went on waiting for the server it
had just stopped (up to three minutes), so a container stopped early in its start was
killed at the end of its grace period. It must stop at once, saying the bootstrap was cut
short.

The Prefect server here can never answer: its database login may not create tables, so its
migrations fail and supervisord keeps restarting it, and `ingest up` keeps waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.fixtures.services import create_database, drop_database
from tests.fixtures.stack import INGEST, free_port, up_environment, wait_for


@pytest.fixture
def prefect_database_no_ddl():
    """A database whose login role may connect but not create tables (PostgreSQL 15's public schema)."""
    url = create_database("prefect_no_ddl")
    role = f"noddl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    parts = urlsplit(url)
    yield parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
    drop_database(url)
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_sigterm_during_the_bootstrap_stops_ingest_up_at_once(prefect_database_no_ddl, ingest_database, tmp_path):
    (tmp_path / "pipelines.toml").write_text(f"[pipelines.stop{uuid.uuid4().hex[:8]}]\nbackfill_cron = \"\"\n")
    env = up_environment(tmp_path, f"http://127.0.0.1:{free_port()}/api", ingest_database, prefect_database_no_ddl,
                         roles="server")
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen([INGEST, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: up.poll() is not None or "spawned: 'prefect-server'" in log.read_text(errors="replace"),
                 120, "supervisord to start the Prefect server")
        assert up.poll() is None, log.read_text(errors="replace")
        up.send_signal(signal.SIGTERM)
        # Well within a container's grace period; before the fix it waited the full three minutes.
        up.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        pytest.fail(f"`ingest up` went on after SIGTERM:\n{log.read_text(errors='replace')[-3000:]}")
    text = log.read_text(errors="replace")
    assert "SIGTERM: stopping the stack" in text, text
    assert "stopped before the bootstrap against Prefect finished" in text, text
    assert "stack up" not in text and "Traceback" not in text, text
