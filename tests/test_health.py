"""`ingest health`: exit 0 when RabbitMQ, PostgreSQL and the Prefect API answer, 1 naming the one that does not."""

from __future__ import annotations

import subprocess

from tests.fixtures.stack import INGEST, free_port


def health(stack, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([INGEST, "health", "--timeout", "3"], env={**stack.env, **overrides},
                          capture_output=True, timeout=60)


def test_healthy_stack(stack):
    result = health(stack)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["rabbitmq", "ok"], ["postgresql", "ok"], ["prefect-api", "ok"]]


def test_a_service_that_does_not_answer_is_named_and_fails_the_check(stack):
    closed = free_port()  # nothing listens there
    result = health(stack, INGEST_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/ingest")
    out = result.stdout.decode()
    assert result.returncode == 1, out
    lines = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert lines["postgresql"].startswith("FAILED: ") and lines["rabbitmq"].startswith("ok")
    result = health(stack, INGEST_PREFECT_API_URL=f"http://127.0.0.1:{closed}/api")
    assert result.returncode == 1 and "prefect-api  FAILED" in result.stdout.decode()
