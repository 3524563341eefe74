"""What a team runs while it writes a pipeline: `ingest new` (scaffold), `ingest try` (its
steps over a file, in-process, writing nothing), `ingest graph` (its DAG)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from ingest.cli.common import chosen_pipelines, fail
from ingest.settings import PROJECT_ROOT, get_settings


def graph(
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="The pipeline whose steps to show.")],
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Mermaid flowchart instead of text.")] = False,
) -> None:
    """Print a pipeline's DAG of steps, as read from the steps' parameters."""
    from ingest.steps import load_program

    (config,) = chosen_pipelines([pipeline], check_steps=True)
    dag = load_program(config, get_settings().pipelines_file).dag
    typer.echo(dag.mermaid() if mermaid else dag.text())


def try_(
    file: Annotated[Path, typer.Argument(help="JSONL file, one record envelope per line.")],
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="The pipeline whose steps to run.")],
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per record, then a summary.")] = False,
) -> None:
    """Run a pipeline's steps over the records of a file, in this process; write nothing.

    Each line is checked against the contract first, as a consumer would. Prints each
    record's row, or why it was refused and by which step, then a summary. Exits 1 if a
    step failed unexpectedly (an error no step meant), 0 otherwise.
    """
    import orjson

    from ingest.contract import InvalidMessage, decode, message_key
    from ingest.inbox import InboxRecord
    from ingest.running import Rejected, run_dag, settle
    from ingest.steps import load_program

    (config,) = chosen_pipelines([pipeline], check_steps=True)
    if not file.exists():
        raise fail(f"{file} does not exist", 2)
    settings = get_settings()
    program = load_program(config, settings.pipelines_file)
    lines, records, invalid = {}, [], {}
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = decode(raw.strip(), None, settings.max_message_bytes)
        except InvalidMessage as exc:
            invalid[number] = exc
            continue
        key = f"{message_key(raw.strip(), None)}#{number}"  # the same body twice is tried twice
        lines[key] = number
        records.append(InboxRecord(key, record.source, record.id, record.type, record.occurred_at, record.data,
                                   record.schema_version))
    outcomes = run_dag(program.dag, records, config)
    rows, skipped, failures = settle(program, [r.message_key for r in records], outcomes)
    report = [{"line": n, "status": "invalid", "reason": e.reason, "error": e.error} for n, e in invalid.items()]
    names = {r.message_key: f"{r.source}/{r.id}" for r in records}
    for key, deleted, values in rows:
        if deleted:  # only the key is known
            values = {k: v for k, v in values.items() if v is not None}
        report.append({"line": lines[key], "record": names[key], "status": "deleted" if deleted else "row",
                       "row": values})
    report += [{"line": lines[k], "record": names[k], "status": "skipped", "reason": r} for k, r in skipped.items()]
    report += [{"line": lines[k], "record": names[k], "status": "failed" if f.unexpected else "rejected",
                "error": f.error} for k, f in failures.items()]
    report.sort(key=lambda entry: entry["line"])
    summary = {status: sum(1 for e in report if e["status"] == status)
               for status in ("row", "deleted", "rejected", "skipped", "invalid", "failed")}
    for entry in report:
        if json_output:
            typer.echo(orjson.dumps(entry, default=str).decode())
        else:
            detail = orjson.dumps(entry["row"], default=str).decode() if "row" in entry else (
                entry.get("error") or entry.get("reason"))
            typer.echo(f"line {entry['line']:>4} {entry.get('record', '-')}: {entry['status']}: {detail}")
    typer.echo(orjson.dumps({"summary": summary}).decode() if json_output else
               "summary: " + ", ".join(f"{n} {s}" for s, n in summary.items()))
    if any(isinstance(f, Rejected) and f.unexpected for f in failures.values()):
        raise typer.Exit(1)


NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")

STEPS_TEMPLATE = '''"""Pipeline `{name}`: its steps and the row of its table `{name}`.

Each step is a plain function; its parameters name what it needs: `record` (the envelope:
source, id, type, occurred_at, data, schema_version) or another step. The one step nothing
depends on returns the row. Try it: ingest try -p {name} samples/{name}.jsonl
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel

from ingest.steps import Reject, Skip


class {model}(BaseModel):
    title: str
    amount: Decimal
    happened_at: datetime


def parsed(record):
    """Runs first: needs only the envelope."""
    if record.data.get("draft"):
        raise Skip("a draft")
    if "amount" not in record.data:
        raise Reject("no amount")
    return {{"title": str(record.data.get("title", "")).strip(), "amount": Decimal(str(record.data["amount"]))}}


def row(parsed, record) -> {model}:
    """The final step: the table's row."""
    return {model}(title=parsed["title"], amount=parsed["amount"], happened_at=record.occurred_at)
'''

TEST_TEMPLATE = '''"""The steps of pipeline `{name}`, on sample records (no services needed)."""

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from ingest.inbox import InboxRecord
from ingest.steps import Reject, Skip
from tasks.{name} import parsed, row

WHEN = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


def record(**data) -> InboxRecord:
    return InboxRecord("id:t-1", "demo", "1", "{name}.event", WHEN, data)


def test_a_record_becomes_its_row():
    r = record(title=" First ", amount="12.50")
    assert row(parsed(r), r).model_dump() == {{"title": "First", "amount": Decimal("12.50"), "happened_at": WHEN}}


def test_a_record_without_amount_is_rejected_and_a_draft_skipped():
    with pytest.raises(Reject):
        parsed(record(title="x"))
    with pytest.raises(Skip):
        parsed(record(draft=True))
'''

SAMPLE_TEMPLATE = """\
{{"id": "1", "source": "demo", "type": "{name}.event", "occurred_at": "2024-05-01T12:00:00Z", "data": {{"title": "First", "amount": "12.50"}}}}
{{"id": "2", "source": "demo", "type": "{name}.event", "occurred_at": "2024-05-01T12:01:00Z", "data": {{"title": "No amount"}}}}
{{"id": "3", "source": "demo", "type": "{name}.event", "occurred_at": "2024-05-01T12:02:00Z", "data": {{"title": "Later", "amount": 3, "draft": true}}}}
{{"id": "4", "source": "demo", "type": "{name}.event", "occurred_at": "not a time", "data": {{}}}}
"""

CONFIG_TEMPLATE = """
[pipelines.{name}]
steps = ["tasks.{name}:parsed", "tasks.{name}:row"]
backfill_cron = ""

[pipelines.{name}.sink]
table = "{name}"
row = "tasks.{name}:{model}"
"""


def new(
    name: Annotated[str, typer.Argument(help="The pipeline's name: lowercase letters, digits, underscores.")],
) -> None:
    """Scaffold a pipeline: tasks/NAME.py (two steps, a row model), its table in the
    pipeline config, tests/test_NAME_steps.py, and samples/NAME.jsonl to try it on."""
    if not NAME.match(name):
        raise fail(f"{name!r}: a pipeline name here is lowercase letters, digits and underscores, "
                   "starting with a letter (it is also a Python module name)", 2)
    settings = get_settings()
    known = chosen_pipelines()
    if name in {p.name for p in known}:
        raise fail(f"pipeline {name!r} exists already in {settings.pipelines_file}", 2)
    model = "".join(part.capitalize() for part in name.split("_")) + "Row"
    files = {
        PROJECT_ROOT / "tasks" / f"{name}.py": STEPS_TEMPLATE.format(name=name, model=model),
        PROJECT_ROOT / "tests" / f"test_{name}_steps.py": TEST_TEMPLATE.format(name=name),
        PROJECT_ROOT / "samples" / f"{name}.jsonl": SAMPLE_TEMPLATE.format(name=name),
    }
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise fail(f"would overwrite {', '.join(existing)}", 2)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        typer.echo(f"created {path.relative_to(PROJECT_ROOT)}")
    with open(settings.pipelines_file, "a", encoding="utf-8") as config:
        config.write(CONFIG_TEMPLATE.format(name=name, model=model))
    typer.echo(f"added [pipelines.{name}] to {settings.pipelines_file}")
    typer.echo(f"next: ingest try -p {name} samples/{name}.jsonl; then ingest bootstrap creates table {name}")
