"""Pipeline `orders`, a worked example: four steps and a typed table.

    order(record) ----> amount_eur(order) --+
         |                                  +--> row(order, amount_eur, customer) -> orders
    customer(record, pipeline) -------------+

`order` parses the payload (amounts as exact Decimals), `amount_eur` converts with a
table in code, `customer` looks the customer up over HTTP (the URL of
`[pipelines.orders.enrich]`; none configured: no lookup), independent of the other two,
so it runs beside them; `row` makes the table's row, or deletes it for `order.deleted`.

Payload: {"order_id": str, "status": str, "amount": "12.50" (string or number),
"currency": "EUR", "customer_id": str, "placed_at": RFC 3339, "items": [...],
"test": bool (optional: test orders are skipped)}.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel

from ingest.inbox import InboxRecord
from ingest.steps import Delete, Reject, Skip, step
from tasks.http import post_json

EUR_PER = {"EUR": Decimal("1"), "USD": Decimal("0.9200"), "GBP": Decimal("1.1700"), "CHF": Decimal("1.0500")}
CENT = Decimal("0.01")


class OrderRow(BaseModel):
    order_id: str
    status: str
    amount: Decimal
    currency: str
    amount_eur: Decimal
    customer_id: str
    customer_name: str | None = None
    customer_tier: str | None = None
    placed_at: datetime
    items: list[dict[str, Any]] = []


def _decimal(value: Any, field: str) -> Decimal:
    # JSON numbers arrive as floats: their shortest text is what the producer wrote.
    try:
        amount = Decimal(value if isinstance(value, str) else repr(value))
    except (InvalidOperation, TypeError):
        raise Reject(f"{field} {value!r} is not a number") from None
    if not amount.is_finite():
        raise Reject(f"{field} {value!r} is not a finite number")
    return amount


def order(record: InboxRecord) -> dict[str, Any]:
    data = record.data or {}
    if data.get("test"):
        raise Skip("a test order")
    if not data.get("order_id"):
        raise Reject("no order_id")
    if record.type == "order.deleted":
        return {"order_id": str(data["order_id"]), "deleted": True}
    currency = str(data.get("currency", "")).upper()
    if currency not in EUR_PER:
        raise Reject(f"currency {data.get('currency')!r} is not one of {', '.join(EUR_PER)}")
    try:
        placed_at = datetime.fromisoformat(str(data["placed_at"]))
    except (KeyError, ValueError):
        raise Reject(f"placed_at {data.get('placed_at')!r} is not an ISO 8601 time") from None
    return {
        "order_id": str(data["order_id"]), "status": str(data.get("status", "created")),
        "amount": _decimal(data.get("amount"), "amount"), "currency": currency,
        "customer_id": str(data.get("customer_id", "")), "placed_at": placed_at, "items": data.get("items") or [],
    }


def amount_eur(order: dict[str, Any]) -> Decimal | None:
    if order.get("deleted"):
        return None
    return (order["amount"] * EUR_PER[order["currency"]]).quantize(CENT)


# The lookups of a chunk wait on the network, not on us: eight at once.
@step(concurrency=8)
def customer(record: InboxRecord, pipeline) -> dict[str, Any]:
    customer_id = (record.data or {}).get("customer_id")
    if pipeline is None or pipeline.enrich is None or not customer_id or record.type == "order.deleted":
        return {}
    config = pipeline.enrich
    return post_json(str(config.url), {"id": str(customer_id)}, timeout_seconds=config.timeout_seconds,
                     retries=config.retries, backoff_seconds=config.backoff_seconds)


def row(order: dict[str, Any], amount_eur: Decimal | None, customer: dict[str, Any]) -> OrderRow | Delete:
    if order.get("deleted"):
        return Delete(order_id=order["order_id"])
    return OrderRow(**order, amount_eur=amount_eur, customer_name=customer.get("name"),
                    customer_tier=customer.get("tier"))
