"""Realistic records for the benchmark: about 1 KiB each, nested data, unicode."""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone

import orjson

NAMES = ["Zoë Ångström", "Björk Guðmundsdóttir", "José Müller", "李小龍", "Ærøskøbing ApS", "Łukasz Żółć", "Chloé Dubois"]
CITIES = ["São Paulo", "Zürich", "Kraków", "東京", "Reykjavík", "Montréal", "Malmö"]


def record(source: str, i: int, rng: random.Random, sent_at: float | None = None) -> bytes:
    """One envelope; `sent_at` (epoch seconds) lets the latency run measure publish-to-stored."""
    data = {
        "customer": {"name": rng.choice(NAMES), "email": f"user{i}@example.com", "tier": rng.choice(["gold", "free"]),
                     "address": {"city": rng.choice(CITIES), "street": f"Straße {rng.randint(1, 300)}", "zip": f"{rng.randint(10000, 99999)}"}},
        "items": [{"sku": f"SKU-{rng.randint(1, 9999):04d}", "qty": rng.randint(1, 5), "price": round(rng.uniform(1, 500), 2),
                   "title": rng.choice(["Kaffeemühle", "Crème brûlée torch", "Smørrebrød plate", "Teekanne 急須"])}
                  for _ in range(rng.randint(5, 7))],
        "notes": "Livraison prévue — merci! " * rng.randint(3, 5),
        "flags": {"gift": rng.random() < 0.2, "express": rng.random() < 0.5, "tags": rng.sample(["a", "b", "c", "d", "e"], 3)},
        "sent_at": sent_at if sent_at is not None else time.time(),
    }
    return orjson.dumps({
        "id": str(i), "source": source, "type": "order.created",
        "occurred_at": datetime.now(timezone.utc).isoformat(), "data": data, "schema_version": 1,
    })


def order(source: str, i: int, rng: random.Random, sent_at: float | None = None) -> bytes:
    """A record as pipeline `orders` reads it (tasks/orders.py): the same payload, plus an order's fields."""
    envelope = orjson.loads(record(source, i, rng, sent_at))
    envelope["data"].update({
        "order_id": f"{source}-{i}", "status": rng.choice(["created", "paid"]),
        "amount": f"{rng.randint(1, 99999)}.{rng.randint(0, 99):02d}", "currency": rng.choice(["EUR", "USD", "GBP"]),
        "customer_id": f"c{rng.randint(1, 5000)}", "placed_at": envelope["occurred_at"],
    })
    return orjson.dumps(envelope)


def batch(source: str, count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [record(source, i, rng) for i in range(count)]
