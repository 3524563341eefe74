"""Peak RSS of one `ingest consumer` with messages near max_message_bytes, and its rate with small ones.

    python -m bench.held_bytes [--messages 600] [--bytes 1040093] [--max-records 200] [--small 20000]

The messages are published before the consumer starts, so the broker offers it all the credit
it has at once (the worst case). The consumer alone, on a fresh database and queue: no Prefect
server (its batches stay pending, which costs it nothing here). INGEST_CONSUMER_MAX_HELD_BYTES
and INGEST_MAX_MESSAGE_BYTES are taken from our environment when set. Prints one line per run:
peak RSS (VmHWM) and, for the small messages, records committed per second (the inbox's
received_at, PostgreSQL's clock).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import uuid
from pathlib import Path

import orjson
import psycopg

from bench.records import record
from bench.run import log, publish_burst
from ingest import db
from ingest.waiting import poll
from tests.fixtures.services import AMQP_URL, create_database, delete_queues, drop_database
from tests.fixtures.stack import INGEST, Process, free_port

INHERITED = ("INGEST_CONSUMER_MAX_HELD_BYTES", "INGEST_MAX_MESSAGE_BYTES")


def padded(size: int):
    """A maker of records whose bodies are exactly `size` bytes."""
    def make(source: str, i: int, rng) -> bytes:
        envelope = {"id": str(i), "source": source, "type": "reading", "occurred_at": "2024-05-01T00:00:00Z",
                    "data": {"pad": ""}}
        envelope["data"]["pad"] = "x" * (size - len(orjson.dumps(envelope)))
        return orjson.dumps(envelope)
    return make


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def consume(env: dict, home: Path, pipeline: str, database_url: str, source: str, count: int) -> tuple[float, float]:
    """Run a consumer until `count` records of `source` are in the inbox: its peak RSS, and records a second."""
    consumer = Process(f"consumer-{source}", [INGEST, "consumer", "-p", pipeline], env, home).start()
    query = "SELECT count(*), extract(epoch FROM max(received_at) - min(received_at)) FROM inbox WHERE source = %s"

    def stored() -> tuple:
        assert consumer.alive, consumer.log_tail()
        with psycopg.connect(database_url) as conn:
            return conn.execute(query, (source,)).fetchone()

    try:
        _, seconds = poll(stored, until=lambda row: row[0] >= count, timeout=600, interval=0.25, what="stored")
        return peak_rss_mib(consumer.popen.pid), count / max(float(seconds), 1e-3)
    finally:
        consumer.stop(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600, help="large messages (default 600; 0: none)")
    parser.add_argument("--bytes", type=int, default=1_040_093, help="their size (default 1,040,093)")
    parser.add_argument("--max-records", type=int, default=200, help="the pipeline's max_records (default 200)")
    parser.add_argument("--small", type=int, default=20_000, help="small (about 1 KiB) messages (default 20,000; 0: none)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-held-"))
    pipeline = f"bench_held_{uuid.uuid4().hex[:6]}"
    (home / "pipelines.toml").write_text(
        f'[pipelines.{pipeline}]\nsink_table = "bench_held"\nbackfill_cron = ""\n'
        f"[pipelines.{pipeline}.batch]\nmax_records = {args.max_records}\n")
    database_url = create_database("bench_held")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "INGEST_")) or k in INHERITED},
        "INGEST_AMQP_URL": AMQP_URL,
        "INGEST_DATABASE_URL": database_url,
        "INGEST_PIPELINES_FILE": str(home / "pipelines.toml"),
        "INGEST_PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",  # nothing listens: batches stay pending
        "INGEST_METRICS_PORT": "0",
        "PREFECT_HOME": str(home / "prefect-home"),
    }
    settings = ", ".join(f"{k}={env[k]}" for k in INHERITED if k in env) or "default settings"
    try:
        with db.connect(database_url, autocommit=True) as conn:
            db.migrate(conn)
        Process("bootstrap", [INGEST, "bootstrap", "--skip-prefect"], env, home).start().popen.wait(120)
        if args.messages:
            log(f"{args.messages} messages of {args.bytes} bytes")
            asyncio.run(publish_burst(pipeline, "large", args.messages, make=padded(args.bytes)))
            rss, _ = consume(env, home, pipeline, database_url, "large", args.messages)
            print(f"large: {args.messages} x {args.bytes} bytes, max_records {args.max_records}, {settings}: "
                  f"peak RSS {rss:.0f} MiB", flush=True)
        if args.small:
            log(f"{args.small} messages of about 1 KiB")
            asyncio.run(publish_burst(pipeline, "small", args.small, make=record))
            rss, rate = consume(env, home, pipeline, database_url, "small", args.small)
            print(f"small: {args.small} x ~1 KiB, max_records {args.max_records}, {settings}: "
                  f"{rate:.0f} records/s committed, peak RSS {rss:.0f} MiB", flush=True)
    finally:
        asyncio.run(delete_queues([pipeline, f"{pipeline}.dlq"]))
        drop_database(database_url)


if __name__ == "__main__":
    main()
