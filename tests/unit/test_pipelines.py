"""The pipeline config: defaults, derived names, and errors that say where the problem is."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.pipelines import Batching, Pipeline, PipelineConfigError, load_pipeline, load_pipelines

REPO_CONFIG = Path(__file__).resolve().parents[2] / "pipelines.toml"


@pytest.fixture
def write(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "pipelines.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def config_error(path: Path) -> str:
    with pytest.raises(PipelineConfigError) as info:
        load_pipelines(path)
    return str(info.value)


def test_defaults_are_applied(write):
    pipelines = load_pipelines(write("[pipelines.orders]\n"))

    assert list(pipelines) == ["orders"]
    orders = pipelines["orders"]
    assert orders.name == "orders"
    assert orders.flow == "ingest"
    assert orders.granularity == "chunk"
    assert orders.chunk_size == 500
    assert orders.task_retries == 2
    assert orders.task_retry_delay_seconds == 2.0
    assert orders.sink_table == "records"
    assert orders.delivery_limit == 5
    assert orders.batch == Batching(max_records=1000, max_bytes=4 * 1024 * 1024, max_linger_ms=1000)
    assert orders.enrich is None


def test_set_values_override_defaults(write):
    path = write(
        """
[pipelines.orders]
granularity = "record"
sink_table = "orders_v2"

[pipelines.orders.batch]
max_records = 50

[pipelines.orders.enrich]
url = "http://enricher:8080/enrich"
"""
    )

    orders = load_pipelines(path)["orders"]

    assert orders.granularity == "record"
    assert orders.sink_table == "orders_v2"
    assert orders.batch.max_records == 50
    assert orders.batch.max_linger_ms == 1000
    assert str(orders.enrich.url) == "http://enricher:8080/enrich"
    assert orders.enrich.retries == 3


def test_derived_names(write):
    path = write("[pipelines.click-stream_2]\n[pipelines.click-stream_2.batch]\nmax_records = 30\n")

    pipeline = load_pipelines(path)["click-stream_2"]

    assert pipeline.queue == "click-stream_2"
    assert pipeline.dlq == "click-stream_2.dlq"
    assert pipeline.deployment == "ingest/click-stream_2"
    assert pipeline.prefetch == 60


def test_several_pipelines_keep_their_order(write):
    path = write("[pipelines.b]\n[pipelines.a]\n[pipelines.c]\n")

    assert list(load_pipelines(path)) == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("text", "pipeline", "field"),
    [
        ("[pipelines.Orders]\n", "Orders", "name"),
        ('[pipelines."orders.eu"]\n', "orders.eu", "name"),
        ("[pipelines.1orders]\n", "1orders", "name"),
        ("[pipelines.orders]\ncolour = 1\n", "orders", "colour"),
        ('[pipelines.orders]\ngranularity = "row"\n', "orders", "granularity"),
        ('[pipelines.orders]\nsink_table = "public.records"\n', "orders", "sink_table"),
        ('[pipelines.orders]\nsink_table = "Records"\n', "orders", "sink_table"),
        ('[pipelines.orders]\nsink_table = "records; drop"\n', "orders", "sink_table"),
        ("[pipelines.orders.batch]\nmax_records = 0\n", "orders", "batch.max_records"),
        ("[pipelines.orders.batch]\nlinger = 5\n", "orders", "batch.linger"),
        ('[pipelines.orders.enrich]\nurl = "not a url"\n', "orders", "enrich.url"),
    ],
)
def test_invalid_pipeline_names_file_pipeline_and_field(write, text, pipeline, field):
    path = write(text)

    message = config_error(path)

    assert message.startswith(f"{path}: pipeline {pipeline!r}: {field}: ")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"

    message = config_error(path)

    assert str(path) in message
    assert "does not exist" in message


def test_invalid_toml(write):
    path = write("[pipelines.orders\n")

    message = config_error(path)

    assert message.startswith(f"{path}: not valid TOML")
    assert "line 1" in message


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "[pipelines]\n"])
def test_no_pipelines(write, text):
    path = write(text)

    assert config_error(path) == f"{path}: declares no pipeline"


def test_unknown_top_level_key(write):
    path = write("[pipeline.orders]\n")

    message = config_error(path)

    assert message.startswith(f"{path}: expected only [pipelines.<name>] tables, found ['pipeline']")


@pytest.mark.parametrize(
    "text",
    ['[pipelines.orders]\nname = "other"\n', "pipelines.orders = 1\n", "pipelines = 1\n"],
    ids=["name-key-in-table", "pipeline-not-a-table", "pipelines-not-a-table"],
)
def test_malformed_tables_are_config_errors(write, text):
    path = write(text)

    assert str(path) in config_error(path)


def test_load_pipeline_by_name(write):
    path = write("[pipelines.orders]\n[pipelines.users]\n")

    assert load_pipeline(path, "users").name == "users"
    with pytest.raises(PipelineConfigError) as info:
        load_pipeline(path, "missing")
    assert str(info.value) == f"{path}: no pipeline 'missing' (known: orders, users)"


def test_repository_config_declares_records():
    pipelines = load_pipelines(REPO_CONFIG)

    records = pipelines["records"]
    assert isinstance(records, Pipeline)
    assert records.queue == "records"
    assert records.dlq == "records.dlq"
    assert records.deployment == "ingest/records"
    assert records.sink_table == "records"
