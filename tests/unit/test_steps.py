"""Pipelines of steps: the DAG read from signatures, every configuration error with its
message, and what Reject, Skip, retries, batch steps and timeouts do to a record."""

from __future__ import annotations

import textwrap
import uuid

import pytest

from ingest.pipelines import PipelineConfigError
from ingest.running import Rejected, Skipped, run_dag
from ingest.steps import StepError, load_dag, step


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write `teamsteps_<n>.py` with the given source; return its module name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"teamsteps_{uuid.uuid4().hex[:12]}"  # a module imported once per test
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


ORDERS = """
    from ingest.steps import Reject, Skip, step

    def order(record):
        if record["kind"] == "bad":
            raise Reject("no amount")
        if record["kind"] == "test":
            raise Skip("a test order")
        return {"amount": record["amount"]}

    def amount_eur(order):
        return order["amount"] * 2

    def customer(record):
        return record["customer"]

    def row(order, amount_eur, customer):
        return {"amount": order["amount"], "eur": amount_eur, "customer": customer}
"""


def paths(name: str, *functions: str) -> list[str]:
    return [f"{name}:{f}" for f in functions]


def test_the_dag_comes_from_the_parameter_names(module):
    name = module(ORDERS)
    dag = load_dag("orders", paths(name, "order", "amount_eur", "customer", "row"))
    assert dag.final == "row"
    assert dag.steps["row"].upstream == ("order", "amount_eur", "customer")
    assert dag.order.index("order") < dag.order.index("amount_eur") < dag.order.index("row")
    assert set(dag.downstream["order"]) == {"amount_eur", "row"}
    assert "order --> amount_eur" in dag.mermaid() and "record --> customer" in dag.mermaid()


def test_a_record_rejected_or_skipped_upstream_goes_no_further(module):
    name = module(ORDERS)
    dag = load_dag("orders", paths(name, "order", "amount_eur", "customer", "row"))
    records = [{"kind": "ok", "amount": 3, "customer": "c1"}, {"kind": "bad", "customer": "c2"},
               {"kind": "test", "customer": "c3"}]
    good, rejected, skipped = run_dag(dag, records, None)
    assert good == {"amount": 3, "eur": 6, "customer": "c1"}
    assert rejected == Rejected("rejected by step order: no amount")
    assert skipped == Skipped("skipped by step order: a test order")


@pytest.mark.parametrize(("source", "functions", "message"), [
    ("def a(record): ...", ["a", "missing"], "has no function 'missing'"),
    ("def a(record): ...\ndef b(nope): ...", ["a", "b"], "parameter 'nope' names no step"),
    ("def a(b): ...\ndef b(a): ...\ndef c(a): ...", ["a", "b", "c"], "steps form a cycle"),
    ("def a(record): ...\ndef b(record): ...", ["a", "b"], "exactly one step must be final", ),
    ("def a(record): ...", ["a", "a"], "two steps are named 'a'"),
    ("def record(record): ...", ["record"], "a step may not be called 'record'"),
    ("def a(*records): ...", ["a"], "parameters *records cannot name what the step needs"),
])
def test_configuration_errors_name_pipeline_step_and_file(module, source, functions, message):
    name = module(source)
    with pytest.raises(StepError) as error:
        load_dag("orders", paths(name, *functions), "pipelines.toml")
    assert message in str(error.value)
    assert str(error.value).startswith("pipelines.toml: pipeline 'orders'")
    assert isinstance(error.value, PipelineConfigError)


def test_an_unknown_module_or_a_bad_path_is_a_clear_error():
    with pytest.raises(StepError, match=r"step 'tasks.nowhere:order': cannot import module 'tasks.nowhere'"):
        load_dag("orders", ["tasks.nowhere:order"])
    with pytest.raises(StepError, match=r"expected 'module:function'"):
        load_dag("orders", ["tasks.orders.order"])


def test_the_file_of_the_step_is_named(module, tmp_path):
    name = module("def a(record): ...\ndef b(missing): ...")
    with pytest.raises(StepError, match=str(tmp_path / f"{name}.py")):
        load_dag("orders", paths(name, "a", "b"))


def test_unexpected_errors_are_retried_then_fail_the_record(module):
    name = module("""
        from ingest.steps import step
        calls = []

        @step(retries=2)
        def flaky(record):
            calls.append(record)
            if len(calls) < 3:
                raise ConnectionError("try again")
            return record

        @step(retries=1)
        def broken(flaky):
            raise ValueError("a bug")
    """)
    dag = load_dag("p", paths(name, "flaky", "broken"))
    (outcome,) = run_dag(dag, ["r"], None)
    assert __import__(name).calls == ["r", "r", "r"]
    assert outcome == Rejected("step broken failed 2 times: ValueError: a bug", unexpected=True)


def test_a_batch_step_takes_lists_and_may_refuse_single_records(module):
    name = module("""
        from ingest.steps import Reject, step

        @step(batch=True)
        def lookup(record):
            return [Reject("unknown") if r < 0 else r * 10 for r in record]

        def row(lookup):
            return lookup + 1
    """)
    dag = load_dag("p", paths(name, "lookup", "row"))
    assert run_dag(dag, [1, -1, 2], None) == [11, Rejected("rejected by step lookup: unknown"), 21]


def test_a_batch_step_must_return_one_value_per_record(module):
    name = module("""
        from ingest.steps import step

        @step(batch=True)
        def short(record):
            return record[:1]
    """)
    dag = load_dag("p", paths(name, "short"))
    assert run_dag(dag, [1, 2], None) == [Rejected("step short (batch) returned a list of 1, expected a list of 2", True)] * 2


def test_a_step_over_its_time_limit_fails_the_record_and_concurrency_runs_records_at_once(module):
    name = module("""
        import time
        from ingest.steps import step

        @step(timeout_seconds=0.2, concurrency=4)
        def slow(record):
            time.sleep(record)
            return record
    """)
    dag = load_dag("p", paths(name, "slow"))
    outcomes = run_dag(dag, [0.01, 2, 0.01, 0.01], None)
    assert outcomes[0] == outcomes[2] == outcomes[3] == 0.01
    assert outcomes[1] == Rejected("step slow failed: TimeoutError: no result after 0.2s", unexpected=True)


def test_step_options_are_checked():
    with pytest.raises(ValueError, match="invalid step options"):
        step(concurrency=0)(lambda record: record)
