"""The worked example `orders` (tasks/orders.py) on the real stack: a team's own steps, their
DAG as Prefect task runs, their rows in a typed table, exactly once.

Messages: orders created then paid (half of them published newest first, so the stale
version arrives last), orders deleted then updated late, orders refused by a step, test
orders skipped, malformed messages, and customers whose lookup fails until the service is
fixed and the runs are retried.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
import orjson

from tests.fixtures.stack import Outgoing, wait_for

T0 = datetime(2024, 5, 1, 9, tzinfo=timezone.utc)
ORDERS, DELETED, REFUSED, SKIPPED, MALFORMED, LOOKUP_FAILS = 725, 100, 100, 100, 50, 20  # 2,000 messages
CURRENCIES = ["EUR", "USD", "GBP", "CHF"]
EUR_PER = {"EUR": Decimal("1"), "USD": Decimal("0.92"), "GBP": Decimal("1.17"), "CHF": Decimal("1.05")}


def envelope(source: str, message: str, kind: str, minutes: int, data: dict) -> Outgoing:
    body = {"id": message, "source": source, "type": kind, "data": data,
            "occurred_at": (T0 + timedelta(minutes=minutes)).isoformat()}
    return Outgoing(orjson.dumps(body), message_id=f"{source}-{message}")


def order_data(n: int, status: str, source: str) -> dict:
    return {"order_id": f"{source}-A{n}", "status": status, "amount": f"{n}.{n % 100:02d}",
            "currency": CURRENCIES[n % 4], "customer_id": f"{source}-c{n}", "placed_at": T0.isoformat(),
            "items": [{"sku": f"sku-{n}", "qty": n % 3 + 1}]}


def messages(source: str) -> list[Outgoing]:
    out = []
    for n in range(ORDERS):
        created = envelope(source, f"{n}-created", "order.created", n % 50, order_data(n, "created", source))
        paid = envelope(source, f"{n}-paid", "order.paid", n % 50 + 60, order_data(n, "paid", source))
        out += [paid, created] if n % 2 else [created, paid]  # odd orders: the stale version arrives last
    for n in range(ORDERS, ORDERS + DELETED):
        out += [envelope(source, f"{n}-created", "order.created", 1, order_data(n, "created", source)),
                envelope(source, f"{n}-deleted", "order.deleted", 120, {"order_id": f"{source}-A{n}"}),
                envelope(source, f"{n}-late", "order.paid", 60, order_data(n, "paid", source))]
    for n in range(REFUSED):
        out.append(envelope(source, f"r{n}", "order.created", 1, {**order_data(n + 5000, "created", source),
                                                                   "currency": "XYZ"}))
    for n in range(SKIPPED):
        out.append(envelope(source, f"s{n}", "order.created", 1, {**order_data(n + 6000, "created", source),
                                                                   "test": True}))
    out += [Outgoing(b'{"id": "broken", ' + str(n).encode(), message_id=f"{source}-m{n}") for n in range(MALFORMED)]
    random.Random(7).shuffle(out)
    return out


def test_orders_land_in_their_typed_table_exactly_once(stack, enrichment_service):
    pipeline = stack.pipeline("orders")
    source = f"shop{uuid.uuid4().hex[:6]}"
    failing = {f"{source}-c{n}" for n in range(LOOKUP_FAILS)}
    enrichment_service.fail_with.update(dict.fromkeys(failing, 503))
    try:
        stack.publish(pipeline.name, messages(source))
        runs = stack.wait_for_runs_final(pipeline, timeout=300)
    finally:
        enrichment_service.fail_with.clear()  # the service is fixed

    # Records refused by a step are failed naming it; test orders skipped; lookups failed.
    rows = stack.query("SELECT record_id, status, error FROM inbox WHERE pipeline = %s AND source = %s",
                       (pipeline.name, source))
    by_status = defaultdict(dict)
    for record_id, status, error in rows:
        by_status[status][record_id] = error
    assert set(by_status["skipped"]) == {f"s{n}" for n in range(SKIPPED)}
    assert all(e == "skipped by step order: a test order" for e in by_status["skipped"].values())
    refused = {f"r{n}" for n in range(REFUSED)}
    lookups = {f"{n}-{v}" for n in range(LOOKUP_FAILS) for v in ("created", "paid")}
    assert set(by_status["failed"]) == refused | lookups, {k: by_status["failed"][k] for k in
                                                          set(by_status["failed"]) - refused - lookups}
    assert all(by_status["failed"][r].startswith("rejected by step order: currency 'XYZ'") for r in refused)
    assert all(by_status["failed"][r].startswith("rejected by step customer: failed after 4 attempts: HTTP 503")
               for r in lookups), {r: by_status["failed"][r] for r in lookups}
    # Malformed messages never reached Prefect: they are in the DLQ.
    assert sum(1 for m in stack.dead_letters(pipeline) if (m.message_id or "").startswith(f"{source}-m")) == MALFORMED

    # The runs with failed records ended Failed. Retried once the service is fixed, they
    # store the orders whose lookup failed; the refused ones fail again (so the exit code is 1).
    assert any(r.state.is_failed() for r in runs)
    retried = stack.replay("runs", "-p", pipeline.name, "--wait", "--timeout", "240")
    assert "waited for" in retried.stdout.decode(), retried.stdout.decode() + retried.stderr.decode()
    assert stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s AND source = %s AND status = 'failed'",
                        (pipeline.name, source)) == REFUSED

    # The table holds exactly the newest valid version of each order, with exact types.
    table = {row[0]: row for row in stack.query(
        "SELECT order_id, status, amount, currency, amount_eur, customer_name, placed_at, deleted_at, items, "
        "source, id, inbox_seq, flow_run_id FROM orders_test WHERE order_id LIKE %s", (f"{source}-%",))}
    assert len(table) == ORDERS + DELETED
    for n in range(ORDERS):
        order_id, status, amount, currency, amount_eur, customer_name, placed_at, deleted_at, items, *lineage = \
            table[f"{source}-A{n}"]
        expected_amount = Decimal(f"{n}.{n % 100:02d}")
        assert (status, amount, currency, deleted_at) == ("paid", expected_amount, CURRENCIES[n % 4], None), n
        assert amount_eur == (expected_amount * EUR_PER[currency]).quantize(Decimal("0.01"))
        assert customer_name == f"Customer {source}-c{n}"
        assert placed_at == T0 and placed_at.utcoffset() == timedelta(0)
        assert items == [{"sku": f"sku-{n}", "qty": n % 3 + 1}]
        assert lineage[0] == source and lineage[1] == f"{n}-paid" and lineage[3] is not None
    for n in range(ORDERS, ORDERS + DELETED):
        row = table[f"{source}-A{n}"]
        # Deleted, by the deletion (the newest version); the late update, whenever it came, did not revive it.
        assert row[7] is not None and row[10] == f"{n}-deleted", row
    # Every row traces back to its message.
    (untraced,), = stack.query(
        "SELECT count(*) FROM orders_test o LEFT JOIN inbox i ON i.seq = o.inbox_seq AND i.pipeline = %s "
        "WHERE o.order_id LIKE %s AND i.seq IS NULL", (pipeline.name, f"{source}-%"))
    assert untraced == 0


def test_the_deployment_carries_the_version_of_the_code(stack):
    from ingest.steps import load_program, version

    pipeline = stack.pipeline("orders")
    deployment = httpx.get(f"{stack.api_url}/deployments/name/{pipeline.deployment}", timeout=30).json()
    assert deployment["version"] == version(load_program(pipeline)) and len(deployment["version"]) == 12


def test_a_runs_task_runs_are_the_pipelines_dag_per_chunk(stack):
    pipeline = stack.pipeline("orders")
    source = f"dag{uuid.uuid4().hex[:6]}"
    stack.publish(pipeline.name, [envelope(source, str(n), "order.created", n, order_data(n, "created", source))
                                  for n in range(120)])
    wait_for(lambda: stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s AND source = %s AND status = 'done'",
                                  (pipeline.name, source)) == 120, 180, "the orders stored", stack)
    run_ids = {r[0] for r in stack.query("SELECT DISTINCT flow_run_id FROM inbox WHERE pipeline = %s AND source = %s",
                                         (pipeline.name, source))}
    upstream = {"order": set(), "customer": set(), "amount_eur": {"order"}, "row": {"order", "amount_eur", "customer"},
                "store": {"row"}}
    for run_id in run_ids:
        records = stack.scalar("SELECT count(*) FROM inbox WHERE flow_run_id = %s", (run_id,))
        chunks = -(-records // pipeline.chunk_size)
        expected = {f"{step} [chunk {n}]" for step in upstream for n in range(1, chunks + 1)}
        # The server records task runs from their events, a moment after they ran.
        task_runs = wait_for(lambda: (found := stack.task_runs(run_id)) and {t.name for t in found} == expected
                             and found, 60, f"the task runs of {run_id}", stack)
        names = {t.id: t.name for t in task_runs}
        for t in task_runs:
            step, chunk = t.name.split(" [chunk ")
            waited = {names[i.id] for i in t.task_inputs.get("wait_for", [])}
            assert waited == {f"{u} [chunk {chunk}" for u in upstream[step]}, (t.name, waited)


def test_with_record_granularity_each_record_is_a_task_run_through_its_steps(stack):
    pipeline = stack.pipeline("ordersrec")
    source = f"rec{uuid.uuid4().hex[:6]}"
    stack.publish(pipeline.name, [
        envelope(source, "created", "order.created", 1, order_data(1, "created", source)),
        envelope(source, "paid", "order.paid", 2, order_data(1, "paid", source)),
        envelope(source, "refused", "order.created", 1, {**order_data(2, "created", source), "currency": "XYZ"}),
        envelope(source, "test", "order.created", 1, {**order_data(3, "created", source), "test": True}),
        envelope(source, "kept", "order.created", 1, order_data(4, "created", source)),
        envelope(source, "deleted", "order.deleted", 5, {"order_id": f"{source}-A4"}),
    ])
    statuses = wait_for(lambda: (rows := dict(stack.query(
        "SELECT record_id, status FROM inbox WHERE pipeline = %s AND source = %s AND status <> 'pending'",
        (pipeline.name, source)))) and len(rows) == 6 and rows, 180, "the records settled", stack)
    assert statuses == {"created": "done", "paid": "done", "refused": "failed", "test": "skipped", "kept": "done",
                        "deleted": "done"}
    rows = {order_id: (status, deleted) for order_id, status, deleted in stack.query(
        "SELECT order_id, status, deleted_at IS NOT NULL FROM orders_record_test WHERE order_id LIKE %s",
        (f"{source}-%",))}
    assert rows[f"{source}-A1"] == ("paid", False)
    assert rows[f"{source}-A4"][1] is True and f"{source}-A2" not in rows and f"{source}-A3" not in rows
    # One task run per record, named source/id; the refused one failed with its step's reason.
    run_ids = {r[0] for r in stack.query("SELECT DISTINCT flow_run_id FROM inbox WHERE pipeline = %s AND source = %s",
                                         (pipeline.name, source))}
    # The server records task runs from their events, a moment after the records settle:
    # wait until each one's final state is in, not only its name.
    names = wait_for(lambda: (found := {t.name: t for r in run_ids for t in stack.task_runs(r)})
                     and len(found) == 6 and all(t.state.is_final() for t in found.values()) and found,
                     60, "the task runs named after their records, in their final states", stack)
    assert set(names) == {f"{source}/{m}" for m in statuses}
    assert names[f"{source}/refused"].state.is_failed()
    assert "rejected by step order: currency 'XYZ'" in names[f"{source}/refused"].state.message
