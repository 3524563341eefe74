"""An enrichment service that fails some records; retrying the run completes only those."""

from __future__ import annotations

import uuid
from collections import Counter

import orjson

from tests.fixtures.stack import Outgoing, wait_for


def test_failed_records_are_listed_and_a_retry_processes_only_them(stack, enrichment_service):
    pipeline = stack.pipeline("enrich")
    source = f"enrich-{uuid.uuid4().hex[:8]}"
    ids = [f"r{i:02d}" for i in range(30)]
    enrichment_service.fail_with.update({"r03": 503, "r07": 503, "r11": 422})
    stack.publish(pipeline.name, [
        Outgoing(orjson.dumps({"id": i, "source": source, "type": "user.updated",
                               "occurred_at": "2024-05-01T10:00:00+02:00", "data": {"name": f"user {i}"}}), f"{source}-{i}")
        for i in ids
    ])

    runs = stack.wait_for_runs_final(pipeline)
    failed_runs = [r for r in runs if r.state.is_failed()]
    assert failed_runs, [r.state for r in runs]
    assert sum(1 for r in runs if not r.state.is_completed() and not r.state.is_failed()) == 0

    # Each failed record is failed in the inbox with the service's answer in its error...
    failed = dict(stack.query(
        "SELECT record_id, error FROM inbox WHERE pipeline = %s AND status = 'failed'", (pipeline.name,)))
    assert set(failed) == {"r03", "r07", "r11"}
    assert "HTTP 503" in failed["r03"] and "after 3 attempts" in failed["r03"]
    assert "HTTP 422" in failed["r11"] and "refused" in failed["r11"]
    # ...5xx answers were retried with backoff, the 4xx one was not...
    calls = Counter(enrichment_service.requests)
    assert calls["r03"] == 3 and calls["r07"] == 3 and calls["r11"] == 1 and calls["r00"] == 1
    # ...every other record is stored with its enrichment...
    stored = dict(stack.query(f"SELECT id, enrichment FROM {pipeline.sink_table} WHERE source = %s", (source,)))
    assert set(stored) == set(ids) - {"r03", "r07", "r11"}
    assert stored["r00"] == {"score": 3, "checked": True}
    # ...the UI shows one task run per record, named after its key, failed ones failed...
    # (The server records task runs from their events, a moment after the flow run ends;
    # until a task run's Running event is in, it carries its default name.)
    def recorded() -> tuple[list[str], set[str]]:
        found = [t for run in runs for t in stack.task_runs(run.id)]
        return sorted(t.name for t in found), {t.name.split("/")[1] for t in found if t.state.is_failed()}

    expected = (sorted(f"{source}/{i}" for i in ids), {"r03", "r07", "r11"})
    wait_for(lambda: recorded() == expected, 60, f"task runs {expected}", stack)
    # ...and the failed run lists its failed records in a table artifact.
    listed = set()
    for run in failed_runs:
        for artifact in stack.artifacts(run.id):
            if artifact.type == "table":
                table = artifact.data if isinstance(artifact.data, list) else orjson.loads(artifact.data)
                listed |= {row["id"] for row in table}
    assert listed == {"r03", "r07", "r11"}

    # The service is fixed; retrying the failed runs, as an operator would, processes only those three.
    enrichment_service.fail_with.clear()
    enrichment_service.requests.clear()
    for run in failed_runs:
        result = stack.prefect("flow-run", "retry", str(run.id))
        assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()

    def retried_runs_completed():
        runs = {r.id: r for r in stack.flow_runs(pipeline)}
        return all(runs[r.id].state.is_completed() for r in failed_runs) and runs

    runs_after = wait_for(retried_runs_completed, 180, "retried runs completed", stack)
    assert sorted(enrichment_service.requests) == ["r03", "r07", "r11"]
    assert len(runs_after) == len(runs)  # the same runs, retried: no new ones
    assert all(runs_after[r.id].run_count == 2 for r in failed_runs)
    assert stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s AND status = 'done'", (pipeline.name,)) == 30
    assert stack.scalar(f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == 30
