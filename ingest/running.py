"""Running a pipeline's steps over records: the same code in a flow run (flows/steps.py) and in
`ingest try`. The steps themselves, and the DAG they form: ingest/steps.py.

A step's outcome for a record is its value, or `Rejected` (a Reject, or an error no step
meant after its retries), or `Skipped`; a record refused upstream keeps that refusal and
is not passed on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from tenacity import Retrying, retry_if_not_exception_type, stop_after_attempt, wait_fixed

from ingest.steps import PIPELINE, RECORD, Dag, Delete, Program, Reject, Skip, Step


@dataclass(frozen=True)
class Rejected:
    error: str
    unexpected: bool = False  # an error no step meant (a bug, a service down), not a Reject


@dataclass(frozen=True)
class Skipped:
    reason: str


Outcome = Any  # a step's value, or Rejected, or Skipped


def _retrying(s: Step, attempts: int) -> Retrying:
    return Retrying(retry=retry_if_not_exception_type((Reject, Skip)), stop=stop_after_attempt(attempts),
                    wait=wait_fixed(s.options.retry_delay_seconds), reraise=True)


def _settle(s: Step, call: Callable[[], Any]) -> Outcome:
    """Run one call of a step with its retries; a refusal or an error becomes the record's outcome."""
    try:
        try:
            # The first attempt without tenacity: most calls succeed, and its bookkeeping cost
            # as much as a small step (about 40 us a call, twice a record in a pipeline of two).
            return call()
        except (Reject, Skip):
            raise
        except Exception:
            if s.options.retries == 0:
                raise
            time.sleep(s.options.retry_delay_seconds)
            return _retrying(s, s.options.retries)(call)
    except Reject as exc:
        return Rejected(f"rejected by step {s.name}: {exc}")
    except Skip as exc:
        return Skipped(f"skipped by step {s.name}: {exc}")
    except Exception as exc:
        attempts = s.options.retries + 1
        return Rejected(f"step {s.name} failed{f' {attempts} times' if attempts > 1 else ''}: "
                        f"{type(exc).__name__}: {exc}", unexpected=True)


def _with_timeout(s: Step, call: Callable[[], Any], pool: ThreadPoolExecutor | None) -> Callable[[], Any]:
    if s.options.timeout_seconds is None or pool is None:
        return call

    def timed() -> Any:
        try:
            return pool.submit(call).result(timeout=s.options.timeout_seconds)
        except FutureTimeout:
            # The call's thread cannot be stopped; it runs on, its result unused.
            raise TimeoutError(f"no result after {s.options.timeout_seconds}s") from None

    return timed


def run_step(s: Step, records: Sequence[Any], pipeline: Any, upstream: dict[str, Sequence[Outcome]]) -> list[Outcome]:
    """Apply a step to records (their envelopes) given its upstream steps' outcomes, in order.

    A record whose upstream outcome is a refusal keeps that refusal and is not passed on.
    """
    def inputs(i: int) -> list[Any]:
        return [records[i] if n == RECORD else pipeline if n == PIPELINE else upstream[n][i] for n in s.inputs]

    outcomes: list[Outcome] = [None] * len(records)
    live = []
    for i in range(len(records)):
        refused = next((upstream[n][i] for n in s.upstream if isinstance(upstream[n][i], (Rejected, Skipped))), None)
        if refused is not None:
            outcomes[i] = refused
        else:
            live.append(i)
    if s.options.batch:
        _run_batch(s, live, inputs, outcomes)
        return outcomes
    timeouts = ThreadPoolExecutor(s.options.concurrency) if s.options.timeout_seconds else None
    try:
        def one(i: int) -> Outcome:
            return _settle(s, _with_timeout(s, lambda: s.func(*inputs(i)), timeouts))

        if s.options.concurrency > 1 and len(live) > 1:
            with ThreadPoolExecutor(s.options.concurrency) as pool:
                for i, outcome in zip(live, pool.map(one, live)):
                    outcomes[i] = outcome
        else:
            for i in live:
                outcomes[i] = one(i)
    finally:
        if timeouts:
            timeouts.shutdown(wait=False)
    return outcomes


def _run_batch(s: Step, live: list[int], inputs: Callable[[int], list[Any]], outcomes: list[Outcome]) -> None:
    if not live:
        return
    columns = list(zip(*(inputs(i) for i in live))) if s.inputs else []
    result = _settle(s, lambda: s.func(*(list(c) for c in columns)))
    if isinstance(result, (Rejected, Skipped)):
        values = [result] * len(live)
    elif not isinstance(result, list) or len(result) != len(live):
        got = f"a list of {len(result)}" if isinstance(result, list) else type(result).__name__
        values = [Rejected(f"step {s.name} (batch) returned {got}, expected a list of {len(live)}", True)] * len(live)
    else:
        values = [Rejected(f"rejected by step {s.name}: {v}") if isinstance(v, Reject)
                  else Skipped(f"skipped by step {s.name}: {v}") if isinstance(v, Skip) else v for v in result]
    for i, value in zip(live, values):
        outcomes[i] = value


def run_dag(dag: Dag, records: Sequence[Any], pipeline: Any) -> list[Outcome]:
    """Every step over these records in one go (record granularity, `ingest try`): the final step's outcomes."""
    outcomes: dict[str, list[Outcome]] = {}
    for name in dag.order:
        outcomes[name] = run_step(dag.steps[name], records, pipeline, outcomes)
    return outcomes[dag.final]


def settle(program: Program, keys: Sequence[str], outcomes: Sequence[Outcome]):
    """The final step's outcomes as (rows to write, skipped, failed): a row is (key, deleted, values).

    What a flow run writes and what `ingest try` prints, from the same code.
    """
    from ingest import sinks

    rows, skipped, failures = [], {}, {}
    for key, outcome in zip(keys, outcomes):
        try:
            if isinstance(outcome, Rejected):
                failures[key] = outcome
            elif isinstance(outcome, Skipped):
                skipped[key] = outcome.reason
            elif isinstance(outcome, Delete):
                rows.append((key, True, sinks.deletion_values(program.sink, outcome.key)))
            else:
                rows.append((key, False, sinks.row_values(program.sink, outcome)))
        except ValueError as exc:  # the row does not fit the model
            failures[key] = Rejected(f"step {program.dag.final}: {exc}")
    return rows, skipped, failures
