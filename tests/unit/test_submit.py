"""The submitter's backoff and its sweep over leased batches, with Prefect and the database
played by fakes (tests/test_submit_lease.py runs the lease against PostgreSQL)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from uuid import uuid4

import pytest

from consumers.submit import Submitter, backoff_seconds
from ingest.pipelines import Pipeline
from ingest.settings import Settings


@pytest.mark.parametrize(("attempts", "cap", "full"), [
    (0, 30.0, 1.0), (1, 30.0, 2.0), (4, 30.0, 16.0), (5, 30.0, 30.0), (1023, 30.0, 30.0),
    (1024, 30.0, 30.0), (5000, 7.5, 7.5), (10**9, 3600.0, 3600.0),
])
def test_backoff_doubles_with_jitter_up_to_its_cap_however_many_the_attempts(attempts, cap, full):
    delays = [backoff_seconds(attempts, cap) for _ in range(100)]
    assert full / 2 <= min(delays) and max(delays) <= full


class FakeCursor:
    def __init__(self, rows):
        self.rows = rows

    async def fetchall(self):
        return self.rows


class FakeDatabase:
    """Answers the lease query with `due`; records every other statement."""

    def __init__(self, due):
        self.due = due
        self.statements: list[tuple[str, tuple]] = []

    async def execute(self, query, params=None):
        query = " ".join(query.split())
        if "RETURNING batch_id, pipeline, attempts" in query:
            return FakeCursor(self.due)
        self.statements.append((query, params))
        return FakeCursor([])

    @asynccontextmanager
    async def connection(self):
        yield self

    def deferred(self) -> dict:
        """batch id -> delay of the batches deferred (inbox.defer_batch)."""
        return {params[2]: params[1] for query, params in self.statements
                if query.startswith("UPDATE batches SET attempts = attempts + 1")}


class PrefectDown:
    async def read_deployment_by_name(self, name):
        raise ConnectionError("Prefect is down")


def submitter(database: FakeDatabase, cap: float = 5.0) -> Submitter:
    settings = Settings(submit_max_backoff_seconds=cap, submit_timeout_seconds=1, stuck_batch_seconds=15)
    result = Submitter(database, settings, {"records": Pipeline(name="records")})
    result.client = PrefectDown()
    return result


def test_a_batch_refused_a_thousand_times_and_more_is_still_deferred_and_the_sweep_goes_on():
    """2.0 ** attempts overflowed after 1023 attempts: that batch was never deferred again,
    and the sweep stopped before the batches claimed after it."""
    veteran, fresh = uuid4(), uuid4()
    database = FakeDatabase([(veteran, "records", 5000), (fresh, "records", 0)])

    asyncio.run(submitter(database, cap=5.0).sweep())

    deferred = database.deferred()
    assert set(deferred) == {veteran, fresh}
    assert 2.5 <= deferred[veteran] <= 5.0
    assert 0.5 <= deferred[fresh] <= 1.0


def test_a_failed_submission_records_the_error_with_the_batch():
    batch = uuid4()
    database = FakeDatabase([(batch, "records", 2)])

    asyncio.run(submitter(database).sweep())

    (query, (error, delay, batch_id)), = database.statements
    assert batch_id == batch and 2.0 <= delay <= 4.0
    assert error == "ConnectionError: Prefect is down"
