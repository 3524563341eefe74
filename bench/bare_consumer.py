"""The baseline: what a team would write without an orchestrator.

An aio-pika consumer that validates each message with the same contract, batches, and
upserts into PostgreSQL with the same newest-wins rule, then acks. No inbox, no Prefect.
Runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aio_pika
import psycopg
from psycopg import sql

from ingest.contract import InvalidMessage, decode

TABLE = """CREATE TABLE IF NOT EXISTS {table} (source text, id text, type text, occurred_at timestamptz,
           data jsonb, ingested_at timestamptz DEFAULT now(), PRIMARY KEY (source, id))"""
UPSERT = """
INSERT INTO {table} AS r (source, id, type, occurred_at, data)
SELECT DISTINCT ON (s, i) s, i, t, o, d::jsonb
FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[]) AS u(s, i, t, o, d)
ORDER BY s, i, o DESC
ON CONFLICT (source, id) DO UPDATE SET type = EXCLUDED.type, occurred_at = EXCLUDED.occurred_at, data = EXCLUDED.data
WHERE r.occurred_at <= EXCLUDED.occurred_at
"""
BATCH, LINGER = 500, 0.2


def table_statement(table: str) -> sql.Composed:
    return sql.SQL(TABLE).format(table=sql.Identifier(table))


def upsert_statement(table: str) -> sql.Composed:
    """The newest-wins upsert of a batch of records into `table` (bench/peers.py uses it too)."""
    return sql.SQL(UPSERT).format(table=sql.Identifier(table))


async def main(amqp_url: str, database_url: str, queue_name: str) -> None:
    db = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await db.execute(table_statement("bare_sink"))
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=2 * BATCH)
    queue = await channel.get_queue(queue_name)
    incoming: asyncio.Queue = asyncio.Queue()
    await queue.consume(incoming.put)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        messages, records = [], []
        try:
            while len(messages) < BATCH:
                message = await asyncio.wait_for(incoming.get(), LINGER if messages else 1.0)
                messages.append(message)
                try:
                    records.append(decode(message.body, message.content_type))
                except InvalidMessage:
                    await message.reject()
                    messages.pop()
        except TimeoutError:
            pass
        if not messages:
            continue
        await db.execute(upsert_statement("bare_sink"), ([r.source for r in records], [r.id for r in records], [r.type for r in records],
                                  [r.occurred_at for r in records], [m.body.decode() for m in messages]))
        for message in messages:
            await message.ack()
    await connection.close()
    await db.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
