"""The peers: what a team would build with Prefect alone, measured beside us on the same server.

- `background`: Prefect's own way to run one task per event. A producer calls
  `store_one.delay(record)` for each record, from many threads at once (each call is one
  API request that creates a task run, plus a write of its parameters to result storage),
  and a task worker (`prefect.task_worker.serve`) runs them.
- `naive`: the seed read literally, one flow run of a deployment per record. `flow.serve()`
  runs each flow run in a process of its own; the producer creates the flow runs
  concurrently through the API.

Each stored record is the bare consumer's upsert (bench/bare_consumer.py) of one record into
a table of its own, so the rows and the rule are the same as ours. The producers read the
records from memory, not from RabbitMQ: that spares the peers the broker, so their figures
are an upper bound. Throughput is the first producer call to the last row stored; the
producer's own rate (records handed over a second) tells which side limits it.

    python -m bench.peers task-worker DATABASE_URL TABLE
    python -m bench.peers produce-tasks SOURCE COUNT
    python -m bench.peers serve-flow DATABASE_URL TABLE
    python -m bench.peers produce-flow-runs SOURCE COUNT
(each with the Prefect API in PREFECT_API_URL; bench/run.py starts them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import psycopg
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from bench.bare_consumer import table_statement, upsert_statement
from bench.records import record
from ingest.contract import decode
from ingest.waiting import apoll

# Concurrent producer calls: beyond about this many the server, not the producer, is the limit.
PRODUCERS = 32
DEPLOYMENT = "peer-naive"
_database: dict = {}


def store(body: bytes) -> None:
    """Validate one record with our contract and upsert it, on a connection kept per process."""
    envelope = decode(body, "application/json")
    connection = _database["connection"]
    connection.execute(upsert_statement(_database["table"]), (
        [envelope.source], [envelope.id], [envelope.type], [envelope.occurred_at], [body.decode()]))


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="store-{body_id}")
def store_one(body: str, body_id: str) -> None:
    store(body.encode())


@flow(name="peer-naive", persist_result=False)
def store_flow(body: str) -> None:
    connect(os.environ["PEER_DATABASE_URL"], os.environ["PEER_TABLE"])  # once per flow-run process
    store(body.encode())


def connect(database_url: str, table: str) -> None:
    if "connection" not in _database:
        _database.update(table=table,
                         connection=psycopg.connect(database_url, autocommit=True))
        _database["connection"].execute(table_statement(table))


def bodies(source: str, count: int) -> list[str]:
    rng = random.Random(7)
    return [record(source, i, rng).decode() for i in range(count)]


def produce_tasks(source: str, count: int) -> tuple[float, float]:
    """`delay()` every record from PRODUCERS threads; returns the epochs of the first call and the last return."""
    payloads = bodies(source, count)
    with ThreadPoolExecutor(PRODUCERS) as pool:
        started = time.time()
        list(pool.map(lambda i: store_one.delay(payloads[i], f"{source}-{i}"), range(count)))
    return started, time.time()


async def produce_flow_runs(source: str, count: int) -> tuple[float, float]:
    """Create a flow run of the peer deployment per record, PRODUCERS at a time."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    payloads = bodies(source, count)
    slots = asyncio.Semaphore(PRODUCERS)
    async with get_client() as client:

        async def registered():
            try:
                return await client.read_deployment_by_name(f"peer-naive/{DEPLOYMENT}")
            except ObjectNotFound:
                return None  # `serve-flow` has not registered it yet

        deployment = await apoll(registered, timeout=120, what="the peer's deployment")

        async def create(i: int) -> None:
            async with slots:
                await client.create_flow_run_from_deployment(deployment.id, parameters={"body": payloads[i]})

        started = time.time()
        await asyncio.gather(*(create(i) for i in range(count)))
    return started, time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("task-worker", "serve-flow"):
        command = commands.add_parser(name)
        command.add_argument("database_url")
        command.add_argument("table")
    for name in ("produce-tasks", "produce-flow-runs"):
        command = commands.add_parser(name)
        command.add_argument("source")
        command.add_argument("count", type=int)
    args = parser.parse_args()
    if args.command == "task-worker":
        from prefect.task_worker import serve

        connect(args.database_url, args.table)
        serve(store_one, limit=PRODUCERS)
    elif args.command == "serve-flow":
        # The table before the clock starts; no connection kept: serve() pickles this module's
        # globals into each flow run's process, and a connection does not pickle.
        with psycopg.connect(args.database_url, autocommit=True) as connection:
            connection.execute(table_statement(args.table))
        os.environ.update(PEER_DATABASE_URL=args.database_url, PEER_TABLE=args.table)
        store_flow.serve(name=DEPLOYMENT, limit=8)
    else:
        produce = produce_tasks if args.command == "produce-tasks" else lambda *a: asyncio.run(produce_flow_runs(*a))
        started, handed_over = produce(args.source, args.count)
        print(orjson.dumps({"started_at": started, "handed_over_at": handed_over}).decode())


if __name__ == "__main__":
    main()
