"""The worker's look-ups for scheduled runs, polled and woken, with Prefect's own look-up played
by a fake (tests/test_worker_wake.py runs the real worker, woken by PostgreSQL)."""

from __future__ import annotations

import asyncio

from prefect.workers.process import ProcessWorker

from flows.worker import WakeableProcessWorker


class FakeLookUps:
    """Prefect's look-up: counts the calls and how many ran at once; each waits for `release`."""

    def __init__(self):
        self.calls = self.running = self.most_at_once = 0
        self.release = asyncio.Event()

    async def __call__(self) -> list:
        self.calls += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await self.release.wait()
        self.running -= 1
        return []


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_wake_ups_during_a_poll_make_one_look_up_after_it_never_one_beside_it(monkeypatch):
    async def scenario() -> FakeLookUps:
        fake = FakeLookUps()
        monkeypatch.setattr(ProcessWorker, "get_and_submit_flow_runs", lambda worker: fake())
        worker = WakeableProcessWorker("postgresql://unused", work_pool_name="pool", limit=4)
        helper = asyncio.create_task(worker._answer_wake_ups())
        poll = asyncio.create_task(worker.get_and_submit_flow_runs())  # the polling loop's, in progress
        await settle()
        for _ in range(10):  # ten new runs announced meanwhile
            worker.wake()
        await settle()
        assert (fake.calls, fake.running) == (1, 1)
        fake.release.set()
        await poll
        await settle()
        assert fake.calls == 2  # one look-up for the ten
        worker.wake()  # a run announced later: a look-up of its own
        await settle()
        helper.cancel()
        return fake

    fake = asyncio.run(scenario())
    assert fake.calls == 3
    assert fake.most_at_once == 1
