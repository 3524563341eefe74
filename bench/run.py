"""`make bench`: end-to-end throughput, latency and memory of the real stack, against a bare consumer.

Everything runs here, in one run, so the figures compare as ratios: a bare aio-pika
consumer (bench/bare_consumer.py: same validation, same batched upsert, no Prefect), then
the whole system started with `ingest up` (supervisord: Prefect server, worker(s),
consumer(s)) on fresh databases, then Prefect's own task ceiling (bench/ceiling.py).
Throughput is first publish to last row stored, read from the sink's `ingested_at`
(PostgreSQL's clock, the same host's), so polling does not blur it. The two pairs compared
as ratios on the same stack (chunk and the orders steps; record and the ceiling) run twice
each, alternated, and each figure is the mean of its two runs.

Then the peers (bench/peers.py): Prefect background tasks, and a flow run per record, on the
same server. Writes bench/results.json and prints a table. Takes 20 minutes on a quiet machine, up to 45 on a busy one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import aio_pika
import orjson
import psycopg
from psycopg import sql

from bench import stages
from bench.records import order, record
from consumers.publisher import Publisher
from ingest.waiting import TimedOut, poll
# The scratch databases are the tests' (TEST_DATABASE_URL, TEST_AMQP_URL).
from tests.fixtures.services import AMQP_URL, create_database, delete_queues, drop_database
from tests.fixtures.stack import completed_task_runs
from tests.fixtures.supervised import SupervisedStack

ROOT = Path(__file__).resolve().parent.parent
PUBLISH_CONCURRENCY = 500
# Settings the stack takes from our environment, to compare runs with and without them.
TUNABLES = ("INGEST_WORKER_POLL_SECONDS", "INGEST_WARM_FLOW_RUNS", "INGEST_EARLY_FLOW_RUNS", "INGEST_WORKER_FLOW_RUNS")

# bench_latency is a pipeline with the shipped defaults (batches of 1,000 records or 1 s,
# at most 1 a second). bench_chunk has the throughput settings of the README's performance
# section: big batches, given time to fill under load (every batch is a flow run, about half
# a CPU-second of overhead each) even when two consumers share the stream (each fills its
# own batches, at half the rate: with 6 s they cut batches of 3,000 to 4,500, 1.7 times the
# runs), no budget of runs (it would cut batches under load), committed 0.5 s after a burst
# ends rather than at the end of the linger. Two consumers each end a burst on a partial
# batch, which waits that long (1 consumer, 20,000 records: 4 full batches, none waits):
# with 2 s, 2 + 2 made 0.82 and 0.85 x the throughput of 1 + 1, with 0.5 s 0.98 and 0.92.
# One task run per 1,000 records. The record pipeline keeps the shipped
# batches (1,000 records or 1 s): a flow run's per-record task runs start while the next
# batch fills, and several runs share the two cores; bigger batches measured slower.
PIPELINES = """
[pipelines.bench_latency]
sink_table = "bench_latency"
backfill_cron = ""

[pipelines.bench_chunk]
granularity = "chunk"
chunk_size = 1000
sink_table = "bench_chunk"
backfill_cron = ""
[pipelines.bench_chunk.batch]
max_records = {chunk_batch}
max_runs_per_second = 0
max_bytes = 16777216
max_linger_ms = {chunk_linger_ms}
max_idle_ms = {chunk_idle_ms}

# The worked example's steps (tasks/orders.py) with bench_chunk's batching, into a typed
# table; without its HTTP lookup (no enrich table: step `customer` returns at once).
[pipelines.bench_orders]
steps = ["tasks.orders:order", "tasks.orders:amount_eur", "tasks.orders:customer", "tasks.orders:row"]
granularity = "chunk"
chunk_size = 1000
backfill_cron = ""
[pipelines.bench_orders.sink]
table = "bench_orders"
row = "tasks.orders:OrderRow"
key = ["order_id"]
[pipelines.bench_orders.batch]
max_records = {chunk_batch}
max_runs_per_second = 0
max_bytes = 16777216
max_linger_ms = {chunk_linger_ms}
max_idle_ms = {chunk_idle_ms}

[pipelines.bench_record]
granularity = "record"
sink_table = "bench_record"
backfill_cron = ""
[pipelines.bench_record.batch]
max_records = {record_batch}
max_linger_ms = {record_linger_ms}
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- databases and the broker ---------------------------------------------------------------


def wait_stored(database_url: str, table: str, source: str, count: int, timeout: float) -> float:
    """Wait until `count` rows of `source` are in `table`; return the epoch of the last one stored."""
    query = sql.SQL("SELECT count(*), extract(epoch FROM max(ingested_at)) FROM {} WHERE source = %s").format(
        sql.Identifier(table))

    def read() -> tuple[int, float | None]:
        with psycopg.connect(database_url) as conn:
            return conn.execute(query, (source,)).fetchone()

    try:
        _, last = poll(read, until=lambda row: row[0] >= count, timeout=timeout, interval=0.25, what="stored")
    except TimedOut as exc:
        raise TimeoutError(f"{table}: {exc.last[0]} of {count} records of {source} stored after {timeout:.0f}s") from None
    return float(last)


def latencies_ms(database_url: str, table: str, source: str) -> list[float]:
    query = sql.SQL("SELECT (extract(epoch FROM ingested_at) - (data->>'sent_at')::float8) * 1000 FROM {} "
                    "WHERE source = %s").format(sql.Identifier(table))
    with psycopg.connect(database_url) as conn:
        return [float(ms) for (ms,) in conn.execute(query, (source,))]


def percentiles(values: list[float]) -> dict:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": round(cuts[49]), "p95_ms": round(cuts[94]), "p99_ms": round(cuts[98]), "samples": len(values)}


# --- publishing ---------------------------------------------------------------------------


async def publish_burst(routing_key: str, source: str, count: int, make=record) -> float:
    """Publish `count` records (made by `make`) as fast as confirms allow; return the epoch of the first publish."""
    import random

    rng = random.Random(7)
    bodies = [make(source, i, rng) for i in range(count)]  # built before the clock starts
    slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)
    async with Publisher(AMQP_URL, connection_name="bench publisher") as publisher:

        async def send(i: int, body: bytes) -> None:
            async with slots:
                await publisher.publish(body, routing_key, message_id=f"{source}-{i}")

        started = time.time()
        tasks = []
        for i, body in enumerate(bodies):
            await slots.acquire()  # keep at most PUBLISH_CONCURRENCY tasks alive
            slots.release()
            tasks.append(asyncio.create_task(send(i, body)))
        await asyncio.gather(*tasks)
    return started


async def publish_at_rate(routing_key: str, source: str, rate: float, seconds: float) -> int:
    """Publish `rate` records a second for `seconds`, each stamped with its send time; return the count."""
    import random

    rng = random.Random(11)
    count = int(rate * seconds)
    async with Publisher(AMQP_URL, connection_name="bench publisher (paced)") as publisher:
        started = time.monotonic()
        tasks = []
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = record(source, i, rng, sent_at=time.time())
            tasks.append(asyncio.create_task(publisher.publish(body, routing_key, message_id=f"{source}-{i}")))
        await asyncio.gather(*tasks)
    return count


# --- peak memory --------------------------------------------------------------------------


class PeakMemory:
    """Samples the peak RSS (VmHWM) of consumer and flow-run processes while it runs."""

    KINDS = {"consumer": ("ingest consumer",), "flow_run": ("prefect.engine", "flows.forkserver")}

    def __init__(self):
        self.peak_kib = dict.fromkeys(self.KINDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    kind = next((k for k, marks in self.KINDS.items() if any(m in cmdline for m in marks)), None)
                    if kind is None:
                        continue
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:  # the process ended meanwhile
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib[kind] = max(self.peak_kib[kind], int(line.split()[1]))

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def megabytes(self) -> dict:
        return {f"{kind}_peak_rss_mb": round(kib / 1024, 1) for kind, kib in self.peak_kib.items()}


# --- the bare consumer --------------------------------------------------------------------


def bench_bare(database_url: str, count: int) -> float:
    queue = f"bench_bare_{uuid.uuid4().hex[:6]}"

    async def declare() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange("ingest", aio_pika.ExchangeType.TOPIC, durable=True)
            declared = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
            await declared.bind(exchange, queue)

    asyncio.run(declare())
    consumer = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_consumer.py"), AMQP_URL, database_url, queue])
    try:
        time.sleep(3)  # connected and consuming before the clock starts
        source = f"bare-{uuid.uuid4().hex[:6]}"
        started = asyncio.run(publish_burst(queue, source, count))
        last = wait_stored(database_url, "bare_sink", source, count, 600)
        return count / (last - started)
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(30)
        asyncio.run(delete_queues([queue]))


# --- the whole system ---------------------------------------------------------------------


def stack(home: Path, ingest_db: str, prefect_db: str, pipelines: str, consumers: int, workers: int) -> SupervisedStack:
    log(f"starting the stack ({consumers} consumer(s), {workers} worker(s)); log: {home}/stack-bench-{consumers}x{workers}.log")
    return SupervisedStack(home, f"bench-{consumers}x{workers}", AMQP_URL, ingest_db, prefect_db, pipelines,
                           consumers, workers, inherit=TUNABLES)


def bench_through(database_url: str, pipeline: str, count: int, make=record, batches: list | None = None) -> float:
    """Records/s, first publish to last row stored; with `batches`, appends the sizes of the batches made."""
    source = f"{pipeline}-{uuid.uuid4().hex[:6]}"
    started = asyncio.run(publish_burst(pipeline, source, count, make))
    last = wait_stored(database_url, pipeline, source, count, 900)
    if batches is not None:
        batches.append(batch_sizes(database_url, source))
    return count / (last - started)


def alternated(first, second) -> tuple[list, list]:
    """Runs of two setups compared as a ratio, as first, second, second, first: a drift over the
    run (a growing Prefect database, a neighbour's load) weighs on both alike, and each figure
    is the mean of two, since two runs of one setup differ by up to 20% here."""
    a, b = [first()], [second()]
    b.append(second())
    a.append(first())
    return a, b


def mean_run(runs: list[dict]) -> dict:
    """Two runs of bench_record or bench_ceiling as one: mean rates, the fewest task runs recorded,
    every dropped event."""
    return {"rps": statistics.mean(r["rps"] for r in runs),
            "task_runs_recorded": min(r["task_runs_recorded"] for r in runs),
            "recorded_rps": round(statistics.mean(r["recorded_rps"] for r in runs), 1),
            "events_dropped": sum(r["events_dropped"] for r in runs)}


def logged(name: str, value):
    log(f"{name} {value:.0f}" if isinstance(value, float) else f"{name} {value}")
    return value


def batch_sizes(database_url: str, source: str) -> list[int]:
    """The records of each batch (each a flow run) that `source`'s records came in, largest first."""
    with psycopg.connect(database_url) as conn:
        return [n for (n,) in conn.execute("SELECT count(*) FROM inbox WHERE source = %s GROUP BY batch_id "
                                           "ORDER BY 1 DESC", (source,))]


def wait_recorded(api_url: str, flow_runs: dict, count: int, started: float, before: int = 0) -> dict:
    """Wait until the server has recorded `count` completed task runs more than `before`, or
    until it records no more for 30 s (it drops events it cannot keep up with). Returns how
    many and how fast."""
    seen = {"recorded": 0, "progress_at": time.time()}

    def read() -> dict:
        now = completed_task_runs(api_url, flow_runs) - before
        if now != seen["recorded"]:
            seen.update(recorded=now, progress_at=time.time())
        return seen

    poll(read, until=lambda s: s["recorded"] >= count or time.time() - s["progress_at"] >= 30, interval=0.5,
         what="task runs recorded")
    recorded, progress_at = seen["recorded"], seen["progress_at"]
    return {"task_runs_recorded": recorded, "recorded_rps": round(recorded / (progress_at - started), 1)}


def bench_record(stack: SupervisedStack, database_url: str, count: int) -> dict:
    """`record` granularity: records stored a second, and task runs the server recorded a second."""
    source = f"bench_record-{uuid.uuid4().hex[:6]}"
    dropped_before = dropped_events(stack)
    runs = {"flows": {"name": {"any_": ["ingest"]}}, "deployments": {"name": {"any_": ["bench_record"]}}}
    recorded_before = completed_task_runs(stack.api_url, runs)  # an earlier run's
    started = asyncio.run(publish_burst("bench_record", source, count))
    last = wait_stored(database_url, "bench_record", source, count, 900)
    return {"rps": count / (last - started), **wait_recorded(stack.api_url, runs, count, started, recorded_before),
            "events_dropped": dropped_events(stack) - dropped_before}


def bench_latency(database_url: str, pipeline: str, rate: float, seconds: float, api_url: str | None = None) -> dict:
    """Publish-to-stored percentiles at `rate`; with `api_url`, also where the time went (bench/stages.py)."""
    source = f"latency-{uuid.uuid4().hex[:6]}"
    count = asyncio.run(publish_at_rate(pipeline, source, rate, seconds))
    wait_stored(database_url, pipeline, source, count, 600)
    result = {**percentiles(latencies_ms(database_url, pipeline, source)), "rate": round(rate, 1),
              "seconds": seconds, "pipeline": pipeline}
    if api_url:
        time.sleep(3)  # the last runs' Completed states and logs reach the server
        result["where"] = stages.measure(database_url, api_url, pipeline, source)
    return result


def bench_ceiling(stack: SupervisedStack, count: int, window: bool = True) -> dict:
    """No-op tasks/s in one flow, with our flows' task runner and (unless `window` is false)
    recording window; and task runs the server recorded a second, from the flow's start."""
    env = prefect_client_environment(stack)
    ceiling = [sys.executable, str(ROOT / "bench" / "ceiling.py")]
    # One warm-up run: the first flow of a process registers the flow and imports lazily.
    subprocess.run([*ceiling, "10"], env=env, check=True, capture_output=True)
    dropped_before = dropped_events(stack)
    result = subprocess.run([*ceiling, str(count), *([] if window else ["--no-window"])], env=env,
                            check=True, capture_output=True)
    flow = orjson.loads(result.stdout.splitlines()[-1])
    runs = {"flow_runs": {"id": {"any_": [flow["flow_run_id"]]}}}
    return {"rps": flow["tasks_per_second"], **wait_recorded(stack.api_url, runs, count, flow["started_at"]),
            "events_dropped": dropped_events(stack) - dropped_before}


def prefect_client_environment(stack: SupervisedStack) -> dict[str, str]:
    """The environment of a process that talks to the stack's Prefect server as our flows do."""
    from ingest.settings import Settings

    return {**stack.env, **Settings(_env_file=None, prefect_api_url=stack.api_url).prefect_environment()}


# Each peer (bench/peers.py): the process that runs the records, and the producer that hands them over.
PEERS = {"background": ("task-worker", "produce-tasks"), "naive": ("serve-flow", "produce-flow-runs")}


def bench_peer(stack: SupervisedStack, database_url: str, peer: str, count: int) -> dict:
    """Records/s of a Prefect-only peer on the stack's server, first producer call to last row
    stored, and how fast its producer handed them over."""
    runner, producer = PEERS[peer]
    env, table, source = prefect_client_environment(stack), f"peer_{peer}", f"{peer}-{uuid.uuid4().hex[:6]}"
    peer_command = [sys.executable, "-m", "bench.peers"]
    peer_log = (stack.log_path.parent / f"peer-{peer}.log").open("wb")
    running = subprocess.Popen([*peer_command, runner, database_url, table], env=env, cwd=ROOT,
                               stdout=peer_log, stderr=subprocess.STDOUT)
    try:
        time.sleep(10)  # subscribed (or its deployment registered) before the clock starts
        produced = subprocess.run([*peer_command, producer, source, str(count)], env=env, cwd=ROOT, check=True,
                                  capture_output=True)
        times = orjson.loads(produced.stdout.splitlines()[-1])
        stored = wait_stored(database_url, table, source, count, 1800)
        return {"rps": count / (stored - times["started_at"]),
                "handed_over_rps": round(count / (times["handed_over_at"] - times["started_at"]), 2), "records": count}
    finally:
        running.terminate()
        running.wait(60)
        peer_log.close()


def dropped_events(stack: SupervisedStack) -> int:
    """State events the Prefect server has dropped since it started (its queues were full)."""
    return stack.log_path.read_text(errors="replace").count("dropping message")


# --- the report ---------------------------------------------------------------------------


def targets(results: dict) -> list[tuple[str, float, str, bool]]:
    t, lat = results["throughput"], results["latency"]
    chunk_ratio = t["chunk_rps"] / t["bare_rps"]
    record_ratio = t["record_rps"] / t["prefect_task_ceiling_rps"]
    recorded = results["task_runs_recorded"]["record"]["task_runs_recorded"] / results["task_runs_recorded"]["of_each"]
    background_ratio = t["record_rps"] / t["prefect_background_rps"]
    rows = [
        ("chunk_rps / bare_rps", round(chunk_ratio, 2), ">= 0.7", chunk_ratio >= 0.7),
        ("chunk_steps_rps / chunk_rps", round(t["chunk_steps_rps"] / t["chunk_rps"], 2), ">= 0.8",
         t["chunk_steps_rps"] / t["chunk_rps"] >= 0.8),
        ("record_rps / prefect_task_ceiling_rps", round(record_ratio, 2), ">= 0.7", record_ratio >= 0.7),
        ("record_rps / prefect_background_rps", round(background_ratio, 1), ">= 10", background_ratio >= 10),
        ("record task runs in Prefect / records", round(recorded, 3), "= 1 (visibility)", recorded == 1),
        ("low-rate p50 (ms)", lat["p50_ms"], "<= 1000", lat["p50_ms"] <= 1000),
        ("low-rate p99 (ms)", lat["p99_ms"], "<= 2000", lat["p99_ms"] <= 2000),
    ]
    if "scale_out" in results:
        s = results["scale_out"]
        rows.append(("2x2 / 1x1 chunk throughput", round(s["ratio"], 3), ">= 0.95", s["ratio"] >= 0.95))
    return rows


def print_table(results: dict) -> None:
    t, lat, mem, rec = results["throughput"], results["latency"], results["memory"], results["task_runs_recorded"]
    lines = [
        f"machine: {results['machine']['cores']} cores, {results['machine']['platform']}",
        "",
        f"{'throughput (records/s)':<44}{'':>10}",
        f"  {'bare_rps (aio-pika + upsert, no Prefect)':<42}{t['bare_rps']:>10.0f}",
        f"  {'chunk_rps (full system, chunk)':<42}{t['chunk_rps']:>10.0f}",
        f"  {'chunk_steps_rps (orders steps, typed table)':<42}{t['chunk_steps_rps']:>10.0f}",
        f"  {'record_rps (full system, record)':<42}{t['record_rps']:>10.0f}",
        f"  {'prefect_task_ceiling_rps (our task runner)':<42}{t['prefect_task_ceiling_rps']:>10.0f}",
        f"  {'  the same, without the recording window':<42}{rec['ceiling_without_window']['rps']:>10.0f}",
        f"  {'prefect_background_rps (task.delay + serve)':<42}{t['prefect_background_rps']:>10.1f}",
        f"  {'prefect_naive_rps (a flow run per record)':<42}{t['prefect_naive_rps']:>10.1f}",
        *(f"    {peer} producer handed over {p['handed_over_rps']}/s ({p['records']} records)"
          for peer, p in results["peers"].items()),
        "  the mean of two runs each, alternated (chunk, steps, steps, chunk; record, ceiling, ceiling, record):",
        *(f"    {name:<40}{', '.join(f'{rps:.0f}' for rps in runs)}" for name, runs in results["runs"].items()),
        "",
        "ours against the peers (x)",
        *(f"  {ours + ' / ' + peer:<42}{t[ours] / t[peer]:>10.2f}"
          for peer in ("bare_rps", "prefect_background_rps", "prefect_naive_rps")
          for ours in ("chunk_rps", "chunk_steps_rps", "record_rps")),
        "",
        f"task runs the Prefect server recorded (of {rec['of_each']} each), recorded/s from the first publish",
        "or flow start, and state events it dropped",
        *(f"  {name:<42}{rec[key]['task_runs_recorded']:>10}{rec[key]['recorded_rps']:>8.0f}/s"
          f"{rec[key]['events_dropped']:>8}"
          for name, key in (("record granularity", "record"), ("ceiling", "ceiling"),
                            ("ceiling without the window", "ceiling_without_window"))),
        "",
        f"{'latency publish -> stored (ms)':<28}{'p50':>8}{'p95':>8}{'p99':>8}  rate",
        f"  {'low rate, default batching':<26}{lat['p50_ms']:>8}{lat['p95_ms']:>8}{lat['p99_ms']:>8}  {lat['rate']}/s",
        f"  {'half of chunk_rps, chunk':<26}{lat['half_load']['p50_ms']:>8}{lat['half_load']['p95_ms']:>8}"
        f"{lat['half_load']['p99_ms']:>8}  {lat['half_load']['rate']}/s",
        "",
        *stages.table_lines(lat["where"]),
        "",
        f"peak RSS: consumer {mem['consumer_peak_rss_mb']} MB, flow-run process {mem['flow_run_peak_rss_mb']} MB",
    ]
    if "scale_out" in results:
        s = results["scale_out"]
        runs = {each: ", ".join(f"{rps:.0f}" for rps in s["runs"][each]) for each in ("1", "2")}
        lines.append(f"scale-out (chunk, mean of two runs each): 1 consumer + 1 worker {s['one_each_rps']:.0f}/s "
                     f"({runs['1']}), 2 consumers + 2 workers {s['two_each_rps']:.0f}/s ({runs['2']})")
    lines += ["", "targets:"]
    lines += [f"  {'met ' if met else 'MISS'} {name:<40}{value:>8}  {target}" for name, value, target, met in targets(results)]
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="records of the throughput runs (default 20000)")
    parser.add_argument("--record-records", type=int, default=20_000,
                        help="records of the `record` granularity run and of the ceiling flow (default 20000)")
    parser.add_argument("--peer-records", type=int, default=1000,
                        help="records of the Prefect background-task peer (default 1000)")
    parser.add_argument("--naive-records", type=int, default=200,
                        help="records of the flow-run-per-record peer (default 200)")
    parser.add_argument("--rate", type=float, default=20, help="records/s of the low-rate latency run (default 20)")
    parser.add_argument("--seconds", type=float, default=60, help="length of each latency run (default 60)")
    parser.add_argument("--chunk-batch", type=int, default=5000, help="max_records of the chunk pipeline")
    parser.add_argument("--record-batch", type=int, default=1000, help="max_records of the record pipeline")
    parser.add_argument("--chunk-linger-ms", type=int, default=12000, help="max_linger_ms of the chunk pipeline")
    parser.add_argument("--chunk-idle-ms", type=int, default=500, help="max_idle_ms of the chunk pipeline")
    parser.add_argument("--record-linger-ms", type=int, default=1000, help="max_linger_ms of the record pipeline")
    parser.add_argument("--skip-scale-out", action="store_true", help="skip the 2 consumers + 2 workers run")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the low-rate latency run and its stages; prints them, writes no results")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args()
    pipelines = PIPELINES.format(chunk_batch=args.chunk_batch, chunk_linger_ms=args.chunk_linger_ms,
                                 chunk_idle_ms=args.chunk_idle_ms,
                                 record_batch=args.record_batch, record_linger_ms=args.record_linger_ms)

    ingest_db, prefect_db = create_database("bench_ingest"), create_database("bench_prefect")
    home = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    results: dict = {
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {k: v for k, v in vars(args).items() if k != "output"},
    }
    try:
        if not args.latency_only:
            log(f"bare consumer: {args.records} records")
            bare_rps = bench_bare(ingest_db, args.records)
            log(f"bare_rps {bare_rps:.0f}")
        with PeakMemory() as memory:
            # Latency first, on a quiet stack: after thousands of task runs the Prefect server
            # spends a minute or more writing their events, and every run waits for it.
            with stack(home, ingest_db, prefect_db, pipelines, consumers=1, workers=1) as running:
                log(f"latency at {args.rate}/s for {args.seconds:.0f}s")
                low = bench_latency(ingest_db, "bench_latency", args.rate, args.seconds, running.api_url)
                log(f"low-rate latency {low}")
                if args.latency_only:
                    print("\n".join(stages.table_lines(low["where"])))
                    return 0
                log(f"chunk granularity and the orders pipeline's steps, alternated: {args.records} records each run")
                chunk_runs, steps_runs = alternated(
                    lambda: logged("chunk_rps", bench_through(ingest_db, "bench_chunk", args.records)),
                    lambda: logged("chunk_steps_rps", bench_through(ingest_db, "bench_orders", args.records, order)))
                chunk_rps, chunk_steps_rps = statistics.mean(chunk_runs), statistics.mean(steps_runs)
                log(f"latency at half of chunk_rps for {args.seconds / 2:.0f}s")
                low["half_load"] = bench_latency(ingest_db, "bench_chunk", chunk_rps / 2, args.seconds / 2)
                log(f"half-load latency {low['half_load']}; record granularity and Prefect's ceiling (no-op "
                    f"tasks), alternated: {args.record_records} each run")
                record_runs, ceiling_runs = alternated(
                    lambda: logged("record", bench_record(running, ingest_db, args.record_records)),
                    lambda: logged("ceiling", bench_ceiling(running, args.record_records)))
                record, ceiling = mean_run(record_runs), mean_run(ceiling_runs)
                log("the ceiling without the recording window")
                unwindowed = bench_ceiling(running, args.record_records, window=False)
                log(f"ceiling without the window {unwindowed}; Prefect background tasks: {args.peer_records} records")
                background = bench_peer(running, ingest_db, "background", args.peer_records)
                log(f"Prefect background tasks {background}; a flow run per record: {args.naive_records} records")
                naive = bench_peer(running, ingest_db, "naive", args.naive_records)
                log(f"a flow run per record {naive}")
        results["throughput"] = {"bare_rps": round(bare_rps, 1), "chunk_rps": round(chunk_rps, 1),
                                 "chunk_steps_rps": round(chunk_steps_rps, 1),
                                 "record_rps": round(record["rps"], 1),
                                 "prefect_task_ceiling_rps": round(ceiling["rps"], 1),
                                 "prefect_background_rps": round(background["rps"], 2),
                                 "prefect_naive_rps": round(naive["rps"], 2)}
        results["peers"] = {"background": background, "naive": naive}
        results["runs"] = {"chunk_rps": [round(r, 1) for r in chunk_runs],
                           "chunk_steps_rps": [round(r, 1) for r in steps_runs],
                           "record_rps": [round(r["rps"], 1) for r in record_runs],
                           "prefect_task_ceiling_rps": [round(r["rps"], 1) for r in ceiling_runs]}
        # Per-record visibility: the task runs the server recorded, how fast, and the state
        # events it dropped during each run.
        recorded = ("task_runs_recorded", "recorded_rps", "events_dropped")
        results["task_runs_recorded"] = {
            "record": {k: record[k] for k in recorded},
            "ceiling": {k: ceiling[k] for k in recorded},
            "ceiling_without_window": {k: unwindowed[k] for k in ("rps", *recorded)},
            "of_each": args.record_records}
        results["latency"] = low
        results["memory"] = memory.megabytes()
        if not args.skip_scale_out:
            # Each on a restarted stack and the same, by now busier, Prefect database, so that
            # only the process counts differ; alternated twice, since two runs of one setup
            # differ by up to 10% here, and each figure is the mean of its two.
            scale: dict[int, list[float]] = {1: [], 2: []}
            batches: dict[int, list[list[int]]] = {1: [], 2: []}
            for each in (1, 2, 1, 2):
                with stack(home, ingest_db, prefect_db, pipelines, consumers=each, workers=each):
                    log(f"scale-out: chunk granularity, {args.records} records, {each} consumer(s) + {each} worker(s)")
                    scale[each].append(bench_through(ingest_db, "bench_chunk", args.records, batches=batches[each]))
                    log(f"{scale[each][-1]:.0f} records/s, batches of {batches[each][-1]}")
            one, two = statistics.mean(scale[1]), statistics.mean(scale[2])
            results["scale_out"] = {"one_each_rps": round(one, 1), "two_each_rps": round(two, 1),
                                    "ratio": round(two / one, 3),
                                    "runs": {str(each): [round(rps, 1) for rps in runs] for each, runs in scale.items()},
                                    "batches": {str(each): sizes for each, sizes in batches.items()}}
        results["targets"] = {name: {"value": value, "target": target, "met": met}
                              for name, value, target, met in targets(results)}
    finally:
        asyncio.run(delete_queues([q for p in ("bench_latency", "bench_chunk", "bench_orders", "bench_record") for q in (p, f"{p}.dlq")]))
        drop_database(ingest_db)
        drop_database(prefect_db)
    args.output.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    print_table(results)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
