"""Usage errors exit 2 with one clear line, before any service is contacted."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ingest.cli.main import app


@pytest.mark.parametrize("args", [
    ["status", "-p", "nope"],
    ["publish", "-p", "nope", "-"],
    ["backfill", "-p", "nope"],
    ["replay", "dlq", "-p", "nope"],
    ["replay", "runs", "-p", "nope"],
])
def test_an_unknown_pipeline_is_a_usage_error(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "unknown pipeline(s) nope; known: records" in result.output
    assert "Exit" not in result.output
