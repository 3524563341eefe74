"""`ingest health`: exit 0 when what the host's roles need answers, 1 naming what does not.
(Per role, on hosts of one role each behind nginx: tests/test_hosts.py.)"""

from __future__ import annotations

import subprocess

from tests.fixtures.services import create_database, drop_database
from tests.fixtures.stack import INGEST, free_port


def health(stack, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([INGEST, "health", "--timeout", "3"], env={**stack.env, **overrides},
                          capture_output=True, timeout=60)


def test_healthy_stack(stack):
    result = health(stack)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    # Every role (INGEST_ROLES unset): everything each needs.
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["rabbitmq", "ok"], ["postgresql", "ok"], ["prefect-db", "ok"], ["prefect-api", "ok"], ["work-pool", "ok"]]


def test_a_service_that_does_not_answer_is_named_and_fails_the_check(stack):
    closed = free_port()  # nothing listens there
    result = health(stack, INGEST_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/ingest")
    out = result.stdout.decode()
    assert result.returncode == 1, out
    lines = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert list(lines) == ["rabbitmq", "postgresql", "prefect-db", "prefect-api", "work-pool"], out  # one line each
    assert lines["postgresql"].startswith("FAILED: ") and lines["rabbitmq"].startswith("ok")
    result = health(stack, INGEST_PREFECT_API_URL=f"http://127.0.0.1:{closed}/api")
    assert result.returncode == 1 and "prefect-api  FAILED" in result.stdout.decode()


def test_a_database_not_migrated_and_a_missing_work_pool_fail_the_check(stack):
    empty = create_database("ingest_unmigrated")
    try:
        result = health(stack, INGEST_DATABASE_URL=empty, INGEST_WORK_POOL="no-such-pool")
    finally:
        drop_database(empty)
    lines = dict(line.split(maxsplit=1) for line in result.stdout.decode().splitlines())
    assert result.returncode == 1, lines
    assert lines["postgresql"].startswith("FAILED: migrations not applied yet: 0001_"), lines
    assert lines["work-pool"].startswith("FAILED: work pool 'no-such-pool' not found (HTTP 404"), lines
    assert lines["prefect-api"].startswith("ok") and lines["rabbitmq"].startswith("ok")
