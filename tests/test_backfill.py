"""Backfills on the real stack: failed mode re-drives failed and stuck records, a retried
backfill run creates nothing new, a dry run changes nothing."""

from __future__ import annotations

import re
import uuid

import orjson

from tests.fixtures.stack import Outgoing, wait_for

WINDOW = ("--start", "2030-01-01T00:00:00Z", "--end", "2030-01-02T00:00:00Z")


def snapshot(stack, pipeline) -> dict:
    """Everything a backfill could change."""
    return {
        "inbox": stack.query("SELECT message_key, status, batch_id FROM inbox WHERE pipeline = %s ORDER BY 1",
                             (pipeline.name,)),
        "batches": stack.query("SELECT batch_id, status FROM batches WHERE pipeline = %s ORDER BY 1", (pipeline.name,)),
        "sink": stack.query(f"SELECT source, id, data, ingested_at FROM {pipeline.sink_table} ORDER BY 1, 2"),
        "runs": sorted((str(r.id), r.state.name, r.run_count) for r in stack.flow_runs(pipeline)),
        "queue": stack.queue_depth(pipeline.queue),
    }


def run_backfill(stack, pipeline, *args: str) -> str:
    result = stack.ingest("backfill", "-p", pipeline.name, *WINDOW, *args)
    return re.search(r"backfill run \S+ \(([0-9a-f-]{36})\) created", result.stdout.decode()).group(1)


def test_backfill_redrives_failed_and_stuck_records_once(stack):
    pipeline = stack.pipeline("backfill")
    source = f"backfill-{uuid.uuid4().hex[:8]}"
    stack.publish(pipeline.name, [
        Outgoing(orjson.dumps({"id": str(i), "source": source, "type": "t", "data": {"i": i},
                               "occurred_at": f"2030-01-01T01:{i // 60:02d}:{i % 60:02d}Z"}), f"{source}-{i}")
        for i in range(120)
    ])
    sink_count = f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s"
    wait_for(lambda: stack.scalar(sink_count, (source,)) == 120, 120, "120 records stored", stack)
    stack.wait_for_runs_final(pipeline)

    # 10 records failed, 5 stuck (pending for two hours, their run lost); their rows gone.
    stack.query("""UPDATE inbox SET status = 'failed', error = 'simulated' WHERE pipeline = %s AND source = %s
                   AND record_id::int < 10 RETURNING 1""", (pipeline.name, source))
    stack.query("""UPDATE inbox SET status = 'pending', received_at = now() - interval '2 hours'
                   WHERE pipeline = %s AND source = %s AND record_id::int BETWEEN 10 AND 14 RETURNING 1""",
                (pipeline.name, source))
    stack.query(f"DELETE FROM {pipeline.sink_table} WHERE source = %s AND id::int < 15 RETURNING 1", (source,))

    before = snapshot(stack, pipeline)
    dry = stack.ingest("backfill", "-p", pipeline.name, *WINDOW, "--dry-run").stdout.decode()
    assert "would reprocess 15 record(s) (10 failed, 5 pending) in 1 batch(es)" in dry, dry
    assert snapshot(stack, pipeline) == before

    run_id = run_backfill(stack, pipeline)
    assert stack.scalar(sink_count, (source,)) == 120
    assert stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s AND status <> 'done'", (pipeline.name,)) == 0
    batches = stack.query("SELECT batch_id, record_count FROM batches WHERE origin = %s", (f"backfill:{run_id}",))
    assert [count for _, count in batches] == [15]
    runs_after_backfill = stack.flow_runs(pipeline)
    assert len(runs_after_backfill) == len(before["runs"]) + 1

    # Retrying the backfill run finds its batch and its run again: nothing new.
    assert stack.prefect("flow-run", "retry", run_id).returncode == 0
    wait_for(lambda: (run := stack.flow_runs_by_id([run_id])[0]).run_count == 2 and run.state.is_completed(),
             120, "the retried backfill run completed", stack)
    assert len(stack.flow_runs(pipeline)) == len(runs_after_backfill)
    assert stack.query("SELECT batch_id, record_count FROM batches WHERE origin = %s", (f"backfill:{run_id}",)) == batches


def test_backfill_of_everything_twice_reprocesses_without_duplicates(stack):
    pipeline = stack.pipeline("backfill")
    in_window = stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s AND occurred_at >= '2030-01-01' "
                             "AND occurred_at < '2030-01-02'", (pipeline.name,))
    assert in_window, "runs after the test above, which published the window's records"
    sink = f"SELECT source, id, data, ingested_at, flow_run_id FROM {pipeline.sink_table} ORDER BY 1, 2"
    rows_before = stack.query(sink)
    runs_before = len(stack.flow_runs(pipeline))
    expected_batches = -(-in_window // pipeline.batch.max_records)
    for attempt in (1, 2):  # a new backfill of the same window reprocesses every time
        run_id = run_backfill(stack, pipeline, "--mode", "all")
        batches = stack.query("SELECT batch_id, flow_run_id FROM batches WHERE origin = %s", (f"backfill:{run_id}",))
        assert len(batches) == expected_batches
        assert len(stack.flow_runs(pipeline)) == runs_before + attempt * expected_batches
        # Every row was stored again, by one of this backfill's runs; none twice, none changed.
        rows = stack.query(sink)
        assert [row[:3] for row in rows] == [row[:3] for row in rows_before]
        assert all(new[3] > old[3] for new, old in zip(rows, rows_before)), "a row was not stored again"
        assert {row[4] for row in rows} == {run for _, run in batches}
        rows_before = rows
