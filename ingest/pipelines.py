"""The pipeline config: each pipeline declared once, everything else derived from it.

A pipeline's name is its routing key, its queue, its deployment's name; its dead-letter
queue is `<name>.dlq`. Bootstrap generates queues, deployments and schedules from here.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
TABLE_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"

EXCHANGE = "ingest"
DEAD_LETTER_EXCHANGE = "ingest.dlx"
INGEST_FLOW = "ingest"
BACKFILL_FLOW = "backfill"
MAINTENANCE_FLOW = "maintenance"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Batching(_Strict):
    """A consumer commits a micro-batch when any of these limits is reached."""

    # Each batch is one flow run, and a flow run costs CPU between the Prefect server, the
    # worker and the run itself, whatever its size: at these defaults a consumer asks at most
    # 1 run a second of a pipeline (a record that finds it unspent goes at once, not after a
    # fixed linger), and big runs under load.
    max_records: int = Field(1000, ge=1, le=10_000, description="Records per batch (one flow run each).")
    max_bytes: int = Field(4 * 1024 * 1024, ge=1, description="Sum of message bodies per batch.")
    max_linger_ms: int = Field(1000, ge=1, description="Longest a record waits for its batch to fill.")
    max_runs_per_second: float = Field(
        1.0, ge=0, description="Commit a batch as soon as it has a record, unless this consumer committed one of "
        "the pipeline's less than 1/max_runs_per_second ago: then when that much time has passed (or the "
        "batch is full, or its linger is over). 0: only full batches and the linger (and max_idle_ms) commit.")
    # For bursts: once a burst ends, its last batch would wait out the whole linger. Off by
    # default, because under a trickle slower than one record per max_idle_ms every record
    # would become a batch, and a flow run, of its own.
    max_idle_ms: int | None = Field(
        None, ge=1, description="Commit a batch early once no record has arrived for this long (default: off)."
    )

    @property
    def longest_fill_seconds(self) -> float:
        """The longest a batch fills before it is due: its linger, or less with the budget."""
        linger = self.max_linger_ms / 1000
        return min(linger, 1 / self.max_runs_per_second) if self.max_runs_per_second > 0 else linger


class Enrichment(_Strict):
    """An HTTP service each record is POSTed to; its JSON answer is stored beside the record."""

    url: HttpUrl
    timeout_seconds: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, description="Retries of 5xx answers and timeouts, with backoff and jitter.")
    backoff_seconds: float = Field(0.5, gt=0, description="First retry delay; it doubles each retry.")


# The shipped `records` pipeline's steps: one instance of the general mechanism.
RECORD_STEPS = ("tasks.normalize:normalize", "tasks.records:row")
ENRICHED_RECORD_STEPS = ("tasks.normalize:normalize", "tasks.enrich:enrich", "tasks.records:enriched_row")


class SinkConfig(_Strict):
    """The table a pipeline's final step fills."""

    table: str | None = Field(None, pattern=TABLE_PATTERN, description="Default: the pipeline's sink_table.")
    row: str = Field("tasks.records:RecordRow", description="The row model (pydantic): columns and types.")
    key: tuple[str, ...] = Field(("source", "id"), min_length=1, description="Primary key columns.")


class Pipeline(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    flow: Literal["ingest"] = Field(INGEST_FLOW, description="The flow each batch runs.")
    granularity: Literal["record", "chunk"] = Field(
        "chunk",
        description="`record`: one task run per record (visible in the UI); `chunk`: one per chunk (volume).",
    )
    chunk_size: int = Field(500, ge=1, description="Records per task run with `chunk` granularity.")
    task_retries: int = Field(2, ge=0, description="Prefect retries of a task run after an unexpected error.")
    task_retry_delay_seconds: float = Field(2.0, ge=0)
    sink_table: str = Field("records", pattern=TABLE_PATTERN, description="Table the records are upserted into.")
    delivery_limit: int = Field(
        5, ge=1, description="Deliveries before the broker dead-letters a message that keeps crashing consumers."
    )
    backfill_cron: str | None = Field(
        "0 3 * * *", description="Schedule of the backfill deployment (cron, UTC); empty: no schedule."
    )
    backfill_mode: Literal["failed", "all"] = Field("failed", description="Mode of the scheduled backfill.")
    backfill_concurrency: int = Field(4, ge=1, description="Ingest runs a backfill keeps in flight at once.")
    stuck_after_seconds: float = Field(
        3600, gt=0, description="A record still pending this long after it arrived counts as stuck."
    )
    # The inbox holds a full copy of every message: without a bound it grows forever.
    inbox_retention_days: int = Field(
        30, ge=1, description="Settled (done or skipped) inbox records older than this are deleted daily, "
        "with the batches left empty; a backfill can reprocess only what is still there.",
    )
    batch: Batching = Batching()
    enrich: Enrichment | None = None
    steps: tuple[str, ...] | None = Field(
        None, description="`module:function` of each step; default: normalize (, enrich), the records row."
    )
    sink: SinkConfig = SinkConfig()

    @model_validator(mode="before")
    @classmethod
    def _one_table_name(cls, values: dict) -> dict:
        # `[sink] table` and `sink_table` name the same table: say it once.
        table = (values.get("sink") or {}).get("table") if isinstance(values.get("sink"), dict) else None
        if table:
            if values.get("sink_table", table) != table:
                raise ValueError(f"sink.table {table!r} and sink_table {values['sink_table']!r} differ: set one")
            values = {**values, "sink_table": table}
        return values

    @property
    def step_paths(self) -> tuple[str, ...]:
        if self.steps is not None:
            return self.steps
        return ENRICHED_RECORD_STEPS if self.enrich else RECORD_STEPS

    @property
    def queue(self) -> str:
        return self.name

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"

    @property
    def deployment(self) -> str:
        """`flow/deployment`, as Prefect names it."""
        return f"{self.flow}/{self.name}"

    @property
    def backfill_deployment(self) -> str:
        return f"{BACKFILL_FLOW}/{self.name}"

    @property
    def maintenance_deployment(self) -> str:
        return f"{MAINTENANCE_FLOW}/{self.name}"

    @property
    def prefetch(self) -> int:
        # Room for one batch being committed while the next one fills.
        return 2 * self.batch.max_records


class PipelineConfigError(Exception):
    pass


def load_pipelines(path: Path) -> dict[str, Pipeline]:
    """Read `[pipelines.<name>]` tables; raise `PipelineConfigError` naming the file and field."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineConfigError(f"pipeline config {path} does not exist (set INGEST_PIPELINES_FILE)") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"pipelines"}
    tables = raw.get("pipelines") or {}
    if unknown or not isinstance(tables, dict):
        raise PipelineConfigError(f"{path}: expected only [pipelines.<name>] tables, found {sorted(raw)}")
    pipelines: dict[str, Pipeline] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise PipelineConfigError(f"{path}: pipelines.{name} must be a table ([pipelines.{name}])")
        if "name" in table:
            raise PipelineConfigError(f"{path}: pipeline {name!r}: no 'name' key, the table header names it")
        try:
            pipelines[name] = Pipeline(name=name, **table)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise PipelineConfigError(f"{path}: pipeline {name!r}: {problems}") from None
    if not pipelines:
        raise PipelineConfigError(f"{path}: declares no pipeline")
    return pipelines


def load_pipeline(path: Path, name: str) -> Pipeline:
    pipelines = load_pipelines(path)
    try:
        return pipelines[name]
    except KeyError:
        raise PipelineConfigError(f"{path}: no pipeline {name!r} (known: {', '.join(pipelines)})") from None
