"""The submission lease on PostgreSQL: a batch is submitted by one consumer at a time, and a
deferred one waits out its backoff; the sweep's deferral is what the lease query then sees."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from consumers.submit import Submitter
from ingest import inbox
from ingest.contract import decode
from ingest.inbox import Accepted
from ingest.pipelines import Pipeline
from ingest.settings import Settings

LEASE = 60.0


async def claim(url: str, pipeline: str) -> list:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await inbox.claim_due_batches(conn, [pipeline], LEASE)


def add_batch(url: str, pipeline: str, due_in: float, attempts: int = 0, origin: str = "consumer"):
    batch = uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO batches (batch_id, pipeline, record_count, attempts, origin, next_attempt_at)
                        VALUES (%s, %s, 1, %s, %s, now() + make_interval(secs => %s))""",
                     (batch, pipeline, attempts, origin, due_in))
    return batch


def seconds_until_due(url: str, batch) -> float:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT extract(epoch FROM next_attempt_at - now()) FROM batches WHERE batch_id = %s",
                            (batch,)).fetchone()[0]


@pytest.fixture
def pipeline() -> str:
    return f"lease_{uuid4().hex[:8]}"


def test_a_due_batch_is_leased_to_one_sweep_until_its_lease_expires(ingest_database, pipeline):
    due = add_batch(ingest_database, pipeline, due_in=-1, attempts=3)
    add_batch(ingest_database, pipeline, due_in=30)  # deferred: not yet
    add_batch(ingest_database, pipeline, due_in=-1, origin="backfill:run")  # its backfill run submits it

    assert asyncio.run(claim(ingest_database, pipeline)) == [(due, pipeline, 3)]
    assert asyncio.run(claim(ingest_database, pipeline)) == []  # another consumer's sweep: leased
    assert LEASE - 5 < seconds_until_due(ingest_database, due) <= LEASE
    with psycopg.connect(ingest_database, autocommit=True) as conn:  # the lease runs out
        conn.execute("UPDATE batches SET next_attempt_at = now() - interval '1 second' WHERE batch_id = %s", (due,))
    assert asyncio.run(claim(ingest_database, pipeline)) == [(due, pipeline, 3)]


def test_a_committed_batch_is_left_to_its_consumer_for_the_lease(ingest_database, pipeline):
    """The consumer that committed it submits it at once; the others' sweeps wait the lease out."""
    body = b'{"id": "1", "source": "lease", "type": "t", "occurred_at": "2024-05-01T12:00:00Z", "data": {}}'
    batch = uuid4()

    async def commit() -> None:
        async with await psycopg.AsyncConnection.connect(ingest_database, autocommit=True) as conn:
            await inbox.write_batch(conn, pipeline, batch, [Accepted(f"id:{batch}", decode(body), body)], LEASE)

    asyncio.run(commit())
    assert asyncio.run(claim(ingest_database, pipeline)) == []
    assert LEASE - 5 < seconds_until_due(ingest_database, batch) <= LEASE


class PrefectDown:
    async def read_deployment_by_name(self, name):
        raise ConnectionError("Prefect is down")


def test_the_sweep_defers_each_batch_prefect_refuses_by_its_backoff(ingest_database, pipeline):
    veteran = add_batch(ingest_database, pipeline, due_in=-1, attempts=5000)
    fresh = add_batch(ingest_database, pipeline, due_in=-1, attempts=0)
    settings = Settings(submit_max_backoff_seconds=20, submit_timeout_seconds=5, stuck_batch_seconds=LEASE)

    async def sweep() -> None:
        async with AsyncConnectionPool(ingest_database, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
            submitter = Submitter(pool, settings, {pipeline: Pipeline(name=pipeline)})
            submitter.client = PrefectDown()
            await submitter.sweep()

    asyncio.run(sweep())
    rows = dict((b, (attempts, error)) for b, attempts, error in psycopg.connect(ingest_database).execute(
        "SELECT batch_id, attempts, last_error FROM batches WHERE pipeline = %s", (pipeline,)).fetchall())
    assert rows == {veteran: (5001, "ConnectionError: Prefect is down"), fresh: (1, "ConnectionError: Prefect is down")}
    assert 10 - 2 < seconds_until_due(ingest_database, veteran) <= 20
    assert 0 < seconds_until_due(ingest_database, fresh) <= 1
    assert asyncio.run(claim(ingest_database, pipeline)) == []  # each waits out its backoff
