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

Running them over records: ingest/running.py, the same code in a flow run (flows/steps.py)
and in `ingest try`.
"""

from __future__ import annotations

import graphlib
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def version(program: Program) -> str:
    """Names the code that processes a pipeline: its config and the source of its steps' and row's modules."""
    import hashlib

    digest = hashlib.sha256(program.pipeline.model_dump_json().encode())
    modules = {inspect.getmodule(s.func) for s in program.dag.steps.values()} | {inspect.getmodule(program.sink.model)}
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode())
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:12]
