"""How a pipeline's steps become Prefect task runs (the steps themselves: ingest/steps.py).

- `chunk` granularity: one task run per step per chunk, named `<step> [chunk n]`, waiting
  for the task runs of the steps it needs, so the flow run's graph in the UI is the
  pipeline's DAG and independent steps of a chunk run at the same time; then one
  `store [chunk n]` writes the chunk's rows and settles its records in one transaction.
  The outcomes travel between a chunk's task runs in memory (`outputs`), never as results
  Prefect would store or walk.
- `record` granularity: one task run per record, named `source/id`, running the record's
  whole DAG and storing its row, committed with the rows other task runs of the flow run
  store at the same time (ingest/group_commit.py).

A record rejected or skipped by a step is not passed to the steps after it. Both return
the records that failed (message key -> error) and how many were skipped; skipped ones
are settled in the inbox with the stored ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.recording import submit_within_window
from ingest import db, sinks
from ingest.group_commit import GroupCommit
from ingest.inbox import InboxRecord
from ingest.settings import get_settings
from ingest.running import Rejected, Skipped, run_dag, run_step, settle
from ingest.steps import Program, Reject


def retry_unless_rejected(task, task_run, state) -> bool:
    """Retrying cannot change a rejection; only unexpected errors (the database, a bug) are retried."""
    try:
        state.result()
    except Reject:
        return False
    except Exception:
        return True
    return False


@dataclass
class Settled:
    failures: dict[str, str] = field(default_factory=dict)  # message key -> error
    skipped: int = 0
    commits: int = 0  # `record`: the group commits its rows took (ingest/group_commit.py)

    def add(self, other: "Settled") -> None:
        self.failures.update(other.failures)
        self.skipped += other.skipped


Stored = tuple[list, dict[str, str]]  # rows to upsert, skipped records (message key -> reason)


def _store(program: Program, run_id: UUID | None, stored: list[Stored]) -> None:
    """Upsert the rows and settle the skipped records of one or more settles: one statement."""
    rows = [row for some, _ in stored for row in some]
    skipped = {key: reason for _, some in stored for key, reason in some.items()}
    with db.pool(get_settings().database_url).connection() as conn:
        sinks.write(conn, program.sink, rows, skipped, run_id)


def _settle(program: Program, records: list[InboxRecord], outcomes: list[Any],
            store: Callable[[Stored], None]) -> Settled:
    """Store the rows, settle skipped records (one transaction); return what failed and how many were skipped."""
    rows, skipped, failures = settle(program, [r.message_key for r in records], outcomes)
    if rows or skipped:
        store((rows, skipped))
    return Settled({key: rejected.error for key, rejected in failures.items()}, len(skipped))


# No cache policy: hashing every record's inputs would cost more than the work itself.
@task(cache_policy=NO_CACHE, persist_result=False)
def step_of_chunk(name: str, program: Program, chunk: list[InboxRecord], outputs: dict, n: int) -> dict[str, int]:
    s = program.dag.steps[name]
    outcomes = run_step(s, chunk, program.pipeline, {u: outputs[(n, u)] for u in s.upstream})
    outputs[(n, name)] = outcomes
    rejected = sum(isinstance(o, Rejected) for o in outcomes)
    skipped = sum(isinstance(o, Skipped) for o in outcomes)
    return {"records": len(outcomes), "rejected": rejected, "skipped": skipped}


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_unless_rejected)
def store_chunk(program: Program, chunk: list[InboxRecord], outputs: dict, n: int, run_id: UUID | None) -> Settled:
    return _settle(program, chunk, outputs[(n, program.dag.final)], lambda stored: _store(program, run_id, [stored]))


def run_chunks(program: Program, records: list[InboxRecord], run_id: UUID | None, error_of) -> Settled:
    pipeline, dag = program.pipeline, program.dag
    size = pipeline.chunk_size
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    outputs: dict[tuple[int, str], list] = {}
    store = store_chunk.with_options(retries=pipeline.task_retries, retry_delay_seconds=pipeline.task_retry_delay_seconds)
    stores = []
    for n, chunk in enumerate(chunks, start=1):
        futures = {}
        for name in dag.order:
            futures[name] = step_of_chunk.with_options(task_run_name=f"{name} [chunk {n}]").submit(
                name, quote(program), quote(chunk), quote(outputs), n,
                wait_for=[futures[u] for u in dag.steps[name].upstream])
        stores.append(store.with_options(task_run_name=f"store [chunk {n}]").submit(
            quote(program), quote(chunk), quote(outputs), n, run_id, wait_for=[futures[dag.final]]))
    settled = Settled()
    for chunk, future in zip(chunks, stores):
        future.wait()
        if future.state.is_completed():
            settled.add(future.result())
        else:  # a step's task run or the chunk's transaction failed
            settled.failures.update(dict.fromkeys((r.message_key for r in chunk), error_of(future.state)))
    return settled


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_unless_rejected,
      task_run_name="{record.source}/{record.id}")
def process_record(record: InboxRecord, program: Program, group: GroupCommit[Stored]) -> int:
    """One record through the whole DAG: its task run carries the record key, so the UI shows each
    outcome. Its row is committed with those of the flow run's other task runs storing at the
    same time (`group`). Returns 1 if the record was skipped, 0 if stored."""
    settled = _settle(program, [record], run_dag(program.dag, [record], program.pipeline), group.write)
    if settled.failures:
        raise Reject(settled.failures[record.message_key])
    return settled.skipped


# How long a record's write waits for other task runs' writes to join it (ingest/group_commit.py).
GROUP_COMMIT_LINGER = 0.005


def run_records(program: Program, records: list[InboxRecord], run_id: UUID | None, error_of) -> Settled:
    pipeline = program.pipeline
    one = process_record.with_options(retries=pipeline.task_retries, retry_delay_seconds=pipeline.task_retry_delay_seconds)
    group = GroupCommit(partial(_store, program, run_id), size=db.POOL_SIZE, linger=GROUP_COMMIT_LINGER)
    # quote(): nothing in the parameters is a future; walking them costs about 0.4 ms a record.
    futures = submit_within_window(one, ((quote(record), quote(program), quote(group)) for record in records), run_id)
    settled = Settled()
    for record, future in zip(records, futures):
        future.wait()
        if future.state.is_completed():
            settled.skipped += future.result()
        else:
            settled.failures[record.message_key] = error_of(future.state)
    settled.commits = group.commits
    return settled
