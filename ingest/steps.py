"""Pipelines of steps: plain functions whose parameter names are their dependencies.

A step is a function in the team's code (`tasks/`, no Prefect needed). Each parameter
names what it needs: `record` (the envelope: source, id, type, occurred_at, data,
schema_version), `pipeline` (the pipeline's config), or another step, whose output it
receives. The DAG is read from the signatures, never declared twice, and the one step
nothing depends on returns the sink row (or `Delete()`).

    @step(retries=3, retry_delay_seconds=1, concurrency=8)   # optional
    def customer(record): ...

A step raises `Reject("why")` to fail the record for good, `Skip("why")` to drop it on
purpose; any other exception is unexpected: retried per the step's `retries`, then the
record fails with it. With `batch=True` a step takes one list per parameter and returns
a list (an element may be a `Reject` or `Skip` instead of a value).

The same code runs a record's DAG in a flow run (flows/steps.py) and in `ingest try`.
"""

from __future__ import annotations

import graphlib
import importlib
import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from tenacity import Retrying, retry_if_not_exception_type, stop_after_attempt, wait_fixed

from ingest.pipelines import Pipeline, PipelineConfigError
from ingest.sinks import Sink, SinkSchemaError, sink_of

# What a step may ask for besides other steps.
RECORD, PIPELINE = "record", "pipeline"
RESERVED = (RECORD, PIPELINE)


class Reject(Exception):
    """This record fails for good: retrying cannot change it (the run lists it with the step's name)."""


class Skip(Exception):
    """This record is dropped on purpose: never stored, counted as `skipped`."""


class Delete:
    """What a final step returns to delete the row of a key (softly: a stale update cannot bring it back).

    `Delete()` deletes the row of the record's own key; `Delete(order_id="A1")` names the
    key's values for a sink whose key is not (source, id).
    """

    def __init__(self, **key: Any):
        self.key = key

    def __repr__(self) -> str:
        return f"Delete({', '.join(f'{k}={v!r}' for k, v in self.key.items())})"


class StepError(PipelineConfigError):
    """A pipeline's steps do not make a valid DAG: the message names pipeline, step and file."""


@dataclass(frozen=True)
class Options:
    retries: int = 0
    retry_delay_seconds: float = 0.0
    timeout_seconds: float | None = None
    concurrency: int = 1
    batch: bool = False


def step(func: Callable | None = None, *, retries: int = 0, retry_delay_seconds: float = 0.0,
         timeout_seconds: float | None = None, concurrency: int = 1, batch: bool = False):
    """Set a step's options; the function itself is returned unchanged (it stays callable)."""
    options = Options(retries, retry_delay_seconds, timeout_seconds, concurrency, batch)
    if retries < 0 or retry_delay_seconds < 0 or concurrency < 1 or (timeout_seconds is not None and timeout_seconds <= 0):
        raise ValueError(f"invalid step options {options}")

    def mark(function: Callable) -> Callable:
        function.__ingest_step__ = options
        return function

    return mark(func) if func is not None else mark


@dataclass(frozen=True)
class Step:
    name: str
    path: str  # "module:function", as in pipelines.toml
    func: Callable
    inputs: tuple[str, ...]
    options: Options
    file: str

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(i for i in self.inputs if i not in RESERVED)


@dataclass(frozen=True)
class Dag:
    pipeline: str
    steps: dict[str, Step]
    order: tuple[str, ...]  # every step after the steps it needs
    final: str
    downstream: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def mermaid(self) -> str:
        lines = ["graph TD", "    record([record])"]
        for name in self.order:
            for source in self.steps[name].inputs:
                if source != PIPELINE:
                    lines.append(f"    {source} --> {name}")
        lines.append(f"    {self.final} --> sink[(sink)]")
        return "\n".join(lines)

    def text(self) -> str:
        width = max(map(len, self.order))
        return "\n".join(
            f"{name:<{width}}  <- {', '.join(self.steps[name].inputs) or '(nothing)'}"
            + ("   => sink row" if name == self.final else "")
            for name in self.order
        )


def _import(pipeline: str, path: str, config_file: str) -> Any:
    where = f"{config_file}: pipeline {pipeline!r}, step {path!r}"
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise StepError(f"{where}: expected 'module:function', e.g. 'tasks.orders:order'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StepError(f"{where}: cannot import module {module_name!r}: {exc}") from None
    found = getattr(module, attribute, None)
    if not callable(found):
        raise StepError(f"{where}: {module.__file__} has no function {attribute!r}")
    return found


def load_dag(pipeline: str, paths: Sequence[str], config_file: str = "pipelines.toml") -> Dag:
    """Import the steps and check that they form one DAG with one final step; raise StepError."""
    steps: dict[str, Step] = {}
    for path in paths:
        func = _import(pipeline, path, config_file)
        name = path.partition(":")[2]
        file = inspect.getsourcefile(func) or "?"
        if name in RESERVED:
            raise StepError(f"{config_file}: pipeline {pipeline!r}: a step may not be called {name!r} ({file})")
        if name in steps:
            raise StepError(f"{config_file}: pipeline {pipeline!r}: two steps are named {name!r}: "
                            f"{steps[name].path} and {path}")
        parameters = inspect.signature(func).parameters.values()
        variadic = [p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if variadic:
            raise StepError(f"{config_file}: pipeline {pipeline!r}, step {name!r} ({file}): parameters "
                            f"*{variadic[0]} cannot name what the step needs")
        options = getattr(func, "__ingest_step__", Options())
        steps[name] = Step(name, path, func, tuple(p.name for p in parameters), options, file)
    if not steps:
        raise StepError(f"{config_file}: pipeline {pipeline!r} has no steps")
    for s in steps.values():
        unknown = [i for i in s.upstream if i not in steps]
        if unknown:
            raise StepError(f"{config_file}: pipeline {pipeline!r}, step {s.name!r} ({s.file}): parameter "
                            f"{unknown[0]!r} names no step (steps: {', '.join(steps)}; or `record`, `pipeline`)")
    try:
        order = tuple(graphlib.TopologicalSorter({n: s.upstream for n, s in steps.items()}).static_order())
    except graphlib.CycleError as exc:
        raise StepError(f"{config_file}: pipeline {pipeline!r}: steps form a cycle: {' -> '.join(exc.args[1])}") from None
    downstream = {n: tuple(m for m in order if n in steps[m].upstream) for n in steps}
    finals = [n for n in order if not downstream[n]]
    if len(finals) != 1:
        raise StepError(f"{config_file}: pipeline {pipeline!r}: exactly one step must be final (nothing depends "
                        f"on it; it returns the sink row), found {len(finals)}: {', '.join(finals)}")
    return Dag(pipeline, steps, order, finals[0], downstream)


@dataclass(frozen=True)
class Program:
    """A pipeline made runnable: its DAG and the sink its final step fills."""

    pipeline: Pipeline
    dag: Dag
    sink: Sink


_programs: dict[tuple, Program] = {}


def load_program(pipeline: Pipeline, config_file: str = "pipelines.toml") -> Program:
    """The pipeline's steps and sink, checked (StepError); loaded once per process."""
    cache_key = (pipeline, str(config_file))
    if cache_key not in _programs:
        dag = load_dag(pipeline.name, pipeline.step_paths, str(config_file))
        model = _import(pipeline.name, pipeline.sink.row, str(config_file))
        try:
            sink = sink_of(pipeline.name, pipeline.sink_table, model, tuple(pipeline.sink.key))
        except SinkSchemaError as exc:
            raise StepError(f"{config_file}: {exc}") from None
        _programs[cache_key] = Program(pipeline, dag, sink)
    return _programs[cache_key]


# --- running steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    error: str
    unexpected: bool = False  # an error no step meant (a bug, a service down), not a Reject


@dataclass(frozen=True)
class Skipped:
    reason: str


Outcome = Any  # a step's value, or Rejected, or Skipped


def _retrying(s: Step) -> Retrying:
    return Retrying(retry=retry_if_not_exception_type((Reject, Skip)), stop=stop_after_attempt(s.options.retries + 1),
                    wait=wait_fixed(s.options.retry_delay_seconds), reraise=True)


def _settle(s: Step, call: Callable[[], Any]) -> Outcome:
    """Run one call of a step with its retries; a refusal or an error becomes the record's outcome."""
    try:
        return _retrying(s)(call)
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


def version(program: Program) -> str:
    """Names the code that processes a pipeline: its config and the source of its steps' and row's modules."""
    import hashlib

    digest = hashlib.sha256(program.pipeline.model_dump_json().encode())
    modules = {inspect.getmodule(s.func) for s in program.dag.steps.values()} | {inspect.getmodule(program.sink.model)}
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode())
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:12]
