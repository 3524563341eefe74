"""Early flow runs on PostgreSQL: a run created while its batch fills waits for the batch's
commit, and past its deadline gives the batch up; the primary key decides between the two,
so a batch is never committed under a run that stopped waiting for it."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import psycopg
import pytest

from ingest import inbox
from ingest.contract import decode
from ingest.inbox import Accepted, BatchIdTaken

LEASE = 60.0
BODY = b'{"id": "1", "source": "early", "type": "t", "occurred_at": "2024-05-01T12:00:00Z", "data": {}}'


@pytest.fixture
def pipeline() -> str:
    return f"early_{uuid4().hex[:8]}"


def commit(url: str, pipeline: str, batch, body: bytes = BODY) -> inbox.Written:
    async def write() -> inbox.Written:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await inbox.write_batch(conn, pipeline, batch, [Accepted(f"id:{batch}", decode(body), body)], LEASE)
    return asyncio.run(write())


def wait(url: str, pipeline: str, batch, run_id, seconds: float) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return inbox.wait_for_commit(conn, pipeline, batch, run_id,
                                     datetime.now(timezone.utc) + timedelta(seconds=seconds))


def wait_while(url: str, pipeline: str, batch, run_id, seconds: float, meanwhile) -> tuple[bool, float]:
    """The run's wait while `meanwhile` runs in another thread; what it saw, and how long it took."""
    thread = threading.Thread(target=meanwhile)
    thread.start()
    started = time.monotonic()
    try:
        return wait(url, pipeline, batch, run_id, seconds), time.monotonic() - started
    finally:
        thread.join()


def test_an_early_run_waits_for_its_batch_and_sees_it_committed(ingest_database, pipeline):
    batch = uuid4()

    def commit_later() -> None:
        time.sleep(0.5)
        commit(ingest_database, pipeline, batch)

    committed, waited = wait_while(ingest_database, pipeline, batch, uuid4(), 30, commit_later)
    assert committed is True
    assert 0.4 < waited < 5


def test_past_its_deadline_the_run_gives_the_batch_up_and_the_late_commit_is_refused(ingest_database, pipeline):
    batch, run_id = uuid4(), uuid4()
    assert wait(ingest_database, pipeline, batch, run_id, seconds=0.2) is False
    with psycopg.connect(ingest_database) as conn:
        row = conn.execute("SELECT record_count, status, flow_run_id, last_error FROM batches WHERE batch_id = %s",
                           (batch,)).fetchone()
    assert row[:3] == (0, "submitted", run_id)
    assert "gave it up" in row[3]
    with pytest.raises(BatchIdTaken):
        commit(ingest_database, pipeline, batch)
    with psycopg.connect(ingest_database) as conn:  # the refused commit left nothing behind
        assert conn.execute("SELECT count(*) FROM inbox WHERE batch_id = %s", (batch,)).fetchone()[0] == 0
    # Retried from the UI later, the run finds its batch given up at once.
    assert wait(ingest_database, pipeline, batch, run_id, seconds=30) is False


def test_a_batch_committed_before_the_deadline_is_not_given_up_at_it(ingest_database, pipeline):
    batch = uuid4()
    commit(ingest_database, pipeline, batch)
    assert wait(ingest_database, pipeline, batch, uuid4(), seconds=0) is True


def test_the_consumer_giving_the_batch_up_ends_the_wait_at_once(ingest_database, pipeline):
    batch, run_id = uuid4(), uuid4()

    async def give_up() -> None:
        await asyncio.sleep(0.3)
        async with await psycopg.AsyncConnection.connect(ingest_database, autocommit=True) as conn:
            await inbox.give_up_batch(conn, pipeline, batch, run_id, "given up by its consumer")

    committed, waited = wait_while(ingest_database, pipeline, batch, run_id, 60, lambda: asyncio.run(give_up()))
    assert committed is False
    assert waited < 5
