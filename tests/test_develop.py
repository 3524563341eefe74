"""The loop a team works in, as it would run it: `ingest new`, the generated tests, `ingest try`,
`ingest graph`; and `ingest try` on the shipped orders example."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import orjson

from tests.fixtures.stack import INGEST

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "PREFECT_"))}, **extra}


def test_new_scaffolds_a_pipeline_that_try_and_its_tests_run_unedited(tmp_path):
    name = f"demo_{uuid.uuid4().hex[:6]}"
    config = tmp_path / "pipelines.toml"
    shutil.copy(REPO / "pipelines.toml", config)  # the scaffold appends its table here
    env = clean_env(INGEST_PIPELINES_FILE=str(config))
    created = [REPO / "tasks" / f"{name}.py", REPO / "tests" / f"test_{name}_steps.py", REPO / "samples" / f"{name}.jsonl"]
    try:
        result = run(INGEST, "new", name, env=env)
        assert result.returncode == 0, result.stderr
        assert all(path.exists() for path in created)
        assert f"[pipelines.{name}]" in config.read_text()
        # Its own tests pass...
        tests = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(created[1]), env=env)
        assert tests.returncode == 0, tests.stdout + tests.stderr
        # ...and `ingest try` runs its steps over its sample: one row, one rejected, one skipped, one invalid.
        tried = run(INGEST, "try", "-p", name, str(created[2]), "--json", env=env)
        assert tried.returncode == 0, tried.stdout + tried.stderr
        lines = [orjson.loads(line) for line in tried.stdout.splitlines()]
        assert lines[-1] == {"summary": {"row": 1, "deleted": 0, "rejected": 1, "skipped": 1, "invalid": 1,
                                         "failed": 0}}
        assert lines[0]["row"] == {"title": "First", "amount": "12.50", "happened_at": "2024-05-01T12:00:00+00:00"}
        assert lines[1]["error"] == "rejected by step parsed: no amount"
        graph = run(INGEST, "graph", "-p", name, env=env)
        assert graph.stdout.splitlines() == ["parsed  <- record", "row     <- parsed, record   => sink row"]
        # A second scaffold of the same name is refused, nothing overwritten.
        again = run(INGEST, "new", name, env=env)
        assert again.returncode == 2 and "exists already" in again.stderr
    finally:
        for path in created:
            path.unlink(missing_ok=True)


def test_try_prints_each_record_and_fails_on_an_unexpected_error(tmp_path):
    env = clean_env()
    tried = run(INGEST, "try", "-p", "orders", "samples/orders.jsonl", env=env)
    assert tried.returncode == 0, tried.stderr
    assert "line    3 shop/o-3: rejected: rejected by step order: currency 'XYZ'" in tried.stdout
    assert tried.stdout.splitlines()[-1] == "summary: 2 row, 1 deleted, 1 rejected, 1 skipped, 0 invalid, 0 failed"
    # A step that raises something no step meant (here: a bug) makes `ingest try` exit 1.
    module = tmp_path / "buggy_steps.py"
    module.write_text("def row(record):\n    return 1 / 0\n")
    config = tmp_path / "pipelines.toml"
    config.write_text('[pipelines.buggy]\nsteps = ["buggy_steps:row"]\n')
    env = clean_env(INGEST_PIPELINES_FILE=str(config), PYTHONPATH=str(tmp_path))
    tried = run(INGEST, "try", "-p", "buggy", "samples/records.jsonl", env=env)
    assert tried.returncode == 1
    assert "failed: step row failed: ZeroDivisionError: division by zero" in tried.stdout


def test_a_broken_pipeline_is_refused_at_load_with_pipeline_step_and_file(tmp_path):
    config = tmp_path / "pipelines.toml"
    config.write_text('[pipelines.broken]\nsteps = ["tasks.orders:order", "tasks.orders:row"]\n')
    result = run(INGEST, "try", "-p", "broken", "samples/orders.jsonl", env=clean_env(INGEST_PIPELINES_FILE=str(config)))
    assert result.returncode == 2
    assert (f"error: {config}: pipeline 'broken', step 'row' ({REPO / 'tasks' / 'orders.py'}): parameter "
            "'amount_eur' names no step") in result.stderr
