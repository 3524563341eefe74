"""Inbox retention on the real PostgreSQL, and its deployment on the real Prefect server:
settled records and finished batches older than the retention go, in small
transactions; everything else stays; a backfill reaching past it says so."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import orjson
import psycopg

from ingest.retention import purge
from tests.fixtures.stack import wait_for


def add_batch(conn, pipeline: str, age_days: int, records: dict[str, int]) -> uuid.UUID:
    """A batch created `age_days` ago with records of that age: {status: how many}."""
    batch = uuid.uuid4()
    conn.execute("""INSERT INTO batches (batch_id, pipeline, record_count, status, created_at)
                    VALUES (%s, %s, %s, 'submitted', now() - make_interval(days => %s))""",
                 (batch, pipeline, sum(records.values()), age_days))
    for status, count in records.items():
        for _ in range(count):
            conn.execute(
                """INSERT INTO inbox (pipeline, message_key, batch_id, source, record_id, type, occurred_at, body,
                                      status, received_at)
                   VALUES (%(p)s, %(k)s, %(b)s, 's', %(k)s, 't', now(), '{}', %(s)s, now() - make_interval(days => %(d)s))""",
                {"p": pipeline, "k": uuid.uuid4().hex, "b": batch, "s": status, "d": age_days})
    return batch


def statuses(conn, pipeline: str) -> dict:
    return dict(conn.execute("SELECT status, count(*) FROM inbox WHERE pipeline = %s GROUP BY 1", (pipeline,)).fetchall())


def test_purge_deletes_old_settled_records_and_finished_batches_in_small_transactions(ingest_database):
    pipeline, other = f"ret_{uuid.uuid4().hex[:8]}", f"ret_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ingest_database, autocommit=True) as conn:
        done_old = add_batch(conn, pipeline, 40, {"done": 25})
        mixed_old = add_batch(conn, pipeline, 40, {"skipped": 3, "failed": 2, "pending": 1})
        recent = add_batch(conn, pipeline, 1, {"done": 5})
        emptied = add_batch(conn, pipeline, 40, {})  # its records were regrouped by a backfill
        elsewhere = add_batch(conn, other, 40, {"done": 4})
        # One old done record is being updated by a flow run right now: it must be skipped, not waited for.
        locked_key = conn.execute("SELECT message_key FROM inbox WHERE batch_id = %s LIMIT 1", (done_old,)).fetchone()[0]
        # Which transaction deleted each record of the pipeline.
        conn.execute(f"""
            CREATE TABLE deleted_by_{pipeline} (xid bigint);
            CREATE FUNCTION note_{pipeline}() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN INSERT INTO deleted_by_{pipeline} VALUES (txid_current()); RETURN OLD; END $$;
            CREATE TRIGGER note_{pipeline} AFTER DELETE ON inbox FOR EACH ROW
                WHEN (OLD.pipeline = '{pipeline}') EXECUTE FUNCTION note_{pipeline}();""")
        try:
            with psycopg.connect(ingest_database) as holder:
                holder.execute("SELECT 1 FROM inbox WHERE pipeline = %s AND message_key = %s FOR UPDATE",
                               (pipeline, locked_key))
                result = {}

                def run_purge():
                    with psycopg.connect(ingest_database, autocommit=True) as own:
                        result["purged"] = purge(own, pipeline, 30, chunk=10)

                worker = threading.Thread(target=run_purge)
                worker.start()
                worker.join(60)
                assert not worker.is_alive(), "purge waited for a locked row"
                holder.rollback()
            per_transaction = [n for (n,) in conn.execute(
                f"SELECT count(*) FROM deleted_by_{pipeline} GROUP BY xid ORDER BY 1 DESC")]
        finally:
            conn.execute(f"DROP TRIGGER note_{pipeline} ON inbox; DROP FUNCTION note_{pipeline}();"
                         f"DROP TABLE deleted_by_{pipeline}")

        purged = result["purged"]
        assert purged.records == 24 + 3  # all old done but the locked one, and the old skipped
        assert sum(per_transaction) == 27 and max(per_transaction) <= 10 and len(per_transaction) == 3
        assert statuses(conn, pipeline) == {"done": 5 + 1, "failed": 2, "pending": 1}
        assert statuses(conn, other) == {"done": 4}
        batches = {b for (b,) in conn.execute("SELECT batch_id FROM batches WHERE pipeline IN (%s, %s)",
                                              (pipeline, other))}
        # done_old keeps its locked record, so it stays until the next run.
        assert batches == {done_old, mixed_old, recent, elsewhere} and emptied not in batches
        assert purged.batches == 1

        again = purge(conn, pipeline, 30, chunk=10)  # the next day: the record no longer locked
        assert (again.records, again.batches) == (1, 1)
        assert done_old not in {b for (b,) in conn.execute("SELECT batch_id FROM batches WHERE pipeline = %s",
                                                           (pipeline,))}


def test_maintenance_deployment_scheduled_and_runs_on_the_stack(stack):
    pipeline = stack.pipeline("main")
    deployment = httpx.get(f"{stack.api_url}/deployments/name/{pipeline.maintenance_deployment}", timeout=30).json()
    assert deployment["parameters"] == {"pipeline": pipeline.name}
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["30 4 * * *"]
    assert [s["active"] for s in deployment["schedules"]] == [True]

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        old = add_batch(conn, pipeline.name, pipeline.inbox_retention_days + 1, {"done": 3})
    run = httpx.post(f"{stack.api_url}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=30).json()

    def final_state():
        state = httpx.get(f"{stack.api_url}/flow_runs/{run['id']}", timeout=30).json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = wait_for(final_state, 180, "the maintenance run final", stack)
    assert state["type"] == "COMPLETED", state
    assert "deleted 3 inbox record(s) and 1 batch(es)" in state["message"]
    assert stack.scalar("SELECT count(*) FROM batches WHERE batch_id = %s", (old,)) == 0


def test_backfill_past_retention_says_records_may_be_gone(stack):
    pipeline = stack.pipeline("backfill")
    result = stack.ingest("backfill", "-p", pipeline.name, "--start", "2020-01-01", "--end", "2020-01-02", "--dry-run")
    assert "records that arrived more than 30 days ago" in result.stderr.decode()
    assert "may have been deleted from the inbox" in result.stderr.decode()
    recent = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    result = stack.ingest("backfill", "-p", pipeline.name, "--start", recent, "--dry-run")
    assert "may have been deleted" not in result.stderr.decode()


def test_status_shows_the_inbox_size(stack):
    pipeline = stack.pipeline("main")
    status = orjson.loads(stack.ingest("status", "--json", "-p", pipeline.name).stdout)["pipelines"][pipeline.name]
    inbox = status["inbox"]
    assert inbox["rows"] == sum(inbox[s] for s in ("pending", "done", "failed", "skipped"))
    assert inbox["table_bytes"] == stack.scalar("SELECT pg_total_relation_size('inbox')")
    assert "rows (table:" in stack.ingest("status", "-p", pipeline.name).stdout.decode()
