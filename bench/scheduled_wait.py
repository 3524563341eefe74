"""How long new flow runs wait in Scheduled before a worker claims them (Pending), at a low rate.

`python -m bench.scheduled_wait [--rate 20] [--seconds 30]`: starts the stack with `ingest up`
(one pipeline with the shipped defaults, named anew each time: its queue is no other run's) on
fresh databases, publishes
`rate` records a second for `seconds`, then reads every run's states from the Prefect API and
prints one JSON line: the Scheduled -> Pending wait of the runs (ms) and the records'
publish-to-stored latency. INGEST_WORKER_POLL_SECONDS from the environment is passed on.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import orjson

from bench.run import TUNABLES, latencies_ms, percentiles, publish_at_rate, wait_stored
from tests.fixtures.services import AMQP_URL, create_database, delete_queues, drop_database
from tests.fixtures.supervised import SupervisedStack


def scheduled_waits_ms(api_url: str, pipeline: str) -> list[float]:
    """For each run of ingest/<pipeline>: from its Scheduled state to its first Pending one."""
    runs = httpx.post(f"{api_url}/flow_runs/filter", timeout=30,
                      json={"deployments": {"name": {"any_": [pipeline]}}, "flows": {"name": {"any_": ["ingest"]}},
                            "limit": 200}).json()
    waits = []
    for run in runs:
        states = httpx.get(f"{api_url}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=30).json()
        times = {}
        for state in sorted(states, key=lambda s: s["timestamp"]):
            times.setdefault(state["type"], datetime.fromisoformat(state["timestamp"]))
        if "SCHEDULED" in times and "PENDING" in times:
            waits.append((times["PENDING"] - times["SCHEDULED"]).total_seconds() * 1000)
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    ingest_db, prefect_db = create_database("wait_ingest"), create_database("wait_prefect")
    home = Path(tempfile.mkdtemp(prefix="ingest-wait-"))
    pipeline = f"wait_{uuid.uuid4().hex[:6]}"
    pipelines = f'[pipelines.{pipeline}]\nsink_table = "{pipeline}"\nbackfill_cron = ""\n'
    try:
        with SupervisedStack(home, "wait", AMQP_URL, ingest_db, prefect_db, pipelines, consumers=1, workers=1,
                             inherit=TUNABLES, extra={"INGEST_METRICS_PORT": "0"}) as running:
            source = f"wait-{home.name}"
            count = asyncio.run(publish_at_rate(pipeline, source, args.rate, args.seconds))
            wait_stored(ingest_db, pipeline, source, count, 600)
            waits = scheduled_waits_ms(running.api_url, pipeline)
            latency = percentiles(latencies_ms(ingest_db, pipeline, source))
    finally:
        asyncio.run(delete_queues([pipeline, f"{pipeline}.dlq"]))
        drop_database(ingest_db)
        drop_database(prefect_db)
    cuts = statistics.quantiles(waits, n=100, method="inclusive")
    print(orjson.dumps({"runs": len(waits), "scheduled_wait_mean_ms": round(statistics.mean(waits)),
                        "scheduled_wait_p50_ms": round(cuts[49]), "scheduled_wait_max_ms": round(max(waits)),
                        "latency": latency, "rate": args.rate, "seconds": args.seconds}).decode())


if __name__ == "__main__":
    main()
