"""The inbox and the batches: the durable hand-off between consumers and flow runs.

Consumers write (async connections); flow runs read and settle (sync connections).
Every write here is idempotent, so any step may be repeated after a crash.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from uuid import UUID

import psycopg

from ingest.contract import Record


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid message, ready for the inbox."""

    message_key: str
    record: Record
    body: bytes

    @property
    def body_sha256(self) -> bytes:
        return hashlib.sha256(self.body).digest()


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch's write did: records new to the inbox, and the messages whose key the
    inbox holds with another body (index in the batch -> that body's SHA-256 in hex, None if
    it was stored before hashes were kept)."""

    inserted: int
    conflicts: dict[int, str | None]


@dataclass(frozen=True, slots=True)
class InboxRecord:
    """A record as a flow run loads it: the envelope its steps receive as `record`."""

    message_key: str
    source: str
    id: str
    type: str
    occurred_at: datetime
    data: dict | None = None
    schema_version: int | None = None

    @property
    def key(self) -> str:
        return f"{self.source}/{self.id}"


# Since when a record is pending: its arrival, or the backfill that set it pending again
# (ingest/windows.py); what counts as old for monitoring and `stuck`. The expression of
# the index inbox_pending_since, which these queries use.
PENDING_SINCE = "coalesce(requeued_at, received_at)"

# A record still pending `%(stuck)s` seconds after it arrived (or was requeued): its batch
# never got a run, or its run crashed or was lost. `ingest status` counts them; a
# backfill in mode `failed` takes them.
STUCK = f"status = 'pending' AND {PENDING_SINCE} < now() - make_interval(secs => %(stuck)s)"


class BatchIdTaken(Exception):
    """The batch's early flow run gave the batch up before its commit: commit it under another id."""


# ON CONFLICT: the row of a batch given up by its early flow run (see GIVE_UP_BATCH).
_INSERT_BATCH = """
INSERT INTO batches (batch_id, pipeline, record_count, next_attempt_at)
VALUES (%(batch_id)s, %(pipeline)s, 0, now() + make_interval(secs => %(lease)s))
ON CONFLICT (batch_id) DO NOTHING
"""

# unnest() makes the whole batch one statement; the body is cast by PostgreSQL itself so
# numbers keep their exact text. Duplicates inside the batch collapse on the primary key.
# The arrays go in binary (%b): in text, psycopg escapes every quote of every body with a
# regular expression, which cost more CPU than all the rest of the consumer.
_INSERT_RECORDS = """
INSERT INTO inbox (pipeline, message_key, batch_id, source, record_id, type, occurred_at, body, body_sha256)
SELECT %(pipeline)s, k, %(batch_id)s, s, i, t, o, b::jsonb, h
FROM unnest(%(keys)b::text[], %(sources)b::text[], %(ids)b::text[], %(types)b::text[],
            %(occurred)b::timestamptz[], %(bodies)b::text[], %(hashes)b::bytea[]) AS u(k, s, i, t, o, b, h)
ON CONFLICT (pipeline, message_key) DO NOTHING
"""

# The messages of a batch whose key the inbox holds with another body (a message id used
# again for another record). Compared as jsonb, so that the same JSON sent again with other
# spacing or key order is a duplicate, not a conflict. Run only when some key was there.
_CONFLICTS = """
SELECT u.n - 1, encode(inbox.body_sha256, 'hex')
FROM unnest(%(keys)b::text[], %(bodies)b::text[]) WITH ORDINALITY AS u(k, b, n)
JOIN inbox ON inbox.pipeline = %(pipeline)s AND inbox.message_key = u.k
WHERE inbox.body <> u.b::jsonb
"""


async def write_batch(
    conn: psycopg.AsyncConnection, pipeline: str, batch_id: UUID, accepted: list[Accepted], lease_seconds: float
) -> Written:
    """Insert a batch and its new records in one transaction; say how many were new, and
    which messages came with a key the inbox holds for another body.

    A batch whose records were all seen before (a redelivery after a crash) is not kept:
    its records already belong to an earlier batch.
    """
    params = {
        "pipeline": pipeline,
        "batch_id": batch_id,
        "lease": lease_seconds,
        "keys": [a.message_key for a in accepted],
        "sources": [a.record.source for a in accepted],
        "ids": [a.record.id for a in accepted],
        "types": [a.record.type for a in accepted],
        "occurred": [a.record.occurred_at for a in accepted],
        "bodies": [a.body.decode("utf-8") for a in accepted],
        "hashes": [a.body_sha256 for a in accepted],
    }
    async with conn.transaction():
        if (await conn.execute(_INSERT_BATCH, params)).rowcount == 0:
            raise BatchIdTaken(f"batch {batch_id} was given up by its early flow run")
        cur = await conn.execute(_INSERT_RECORDS, params)
        inserted = cur.rowcount
        conflicts = {}
        if inserted < len(accepted):
            conflicts = dict(await (await conn.execute(_CONFLICTS, params)).fetchall())
        if inserted:
            await conn.execute(
                "UPDATE batches SET record_count = %s WHERE batch_id = %s", (inserted, batch_id)
            )
        else:
            await conn.execute("DELETE FROM batches WHERE batch_id = %s", (batch_id,))
    return Written(inserted, conflicts)


# Early flow runs (consumers/submit.py): a batch's run may be created as the batch starts
# to fill, so that it starts meanwhile; it waits for the batch's commit until a deadline.
# This row, of no records, ends the wait: the run writes it at its deadline, and the
# consumer when the batch will not be committed (all of it duplicates, dead-lettered or
# given back). Whichever of it and the batch's commit comes first wins on the primary key:
# a run that gave its batch up never sees it committed later (write_batch raises
# BatchIdTaken, and the consumer commits those records under another id).
GIVE_UP_BATCH = """
INSERT INTO batches (batch_id, pipeline, record_count, status, flow_run_id, submitted_at, last_error)
VALUES (%(batch_id)s, %(pipeline)s, 0, 'submitted', %(flow_run_id)s, now(), %(reason)s)
ON CONFLICT (batch_id) DO NOTHING
"""


def _give_up(pipeline: str, batch_id: UUID, flow_run_id: UUID | None, reason: str) -> dict:
    return {"batch_id": batch_id, "pipeline": pipeline, "flow_run_id": flow_run_id, "reason": reason}


async def give_up_batch(conn: psycopg.AsyncConnection, pipeline: str, batch_id: UUID, flow_run_id: UUID,
                        reason: str) -> None:
    """The consumer's side: its batch will not be committed, so its early run may end now."""
    await conn.execute(GIVE_UP_BATCH, _give_up(pipeline, batch_id, flow_run_id, reason))


def wait_for_commit(conn: psycopg.Connection, pipeline: str, batch_id: UUID, flow_run_id: UUID | None,
                    deadline: datetime, interval: float = 0.02) -> bool:
    """The early run's side: True once the batch is committed, False if it gave the batch up
    (nothing committed by `deadline`, or the consumer's give-up row)."""
    while True:
        row = conn.execute("SELECT record_count FROM batches WHERE batch_id = %s", (batch_id,)).fetchone()
        if row is not None:
            return row[0] > 0
        if datetime.now(timezone.utc) >= deadline:
            reason = f"not committed by {deadline:%H:%M:%S} UTC, when its early flow run gave it up"
            if conn.execute(GIVE_UP_BATCH, _give_up(pipeline, batch_id, flow_run_id, reason)).rowcount == 1:
                return False
        else:
            time.sleep(interval)


async def refusal(conn: psycopg.AsyncConnection, accepted: Accepted) -> str | None:
    """Why PostgreSQL would refuse this record's values, or None."""
    try:
        async with conn.transaction():
            # Every value the inbox stores, the message key too: a message id may hold U+0000.
            await conn.execute("SELECT %s::jsonb, %s::timestamptz, %s::text, %s::text, %s::text, %s::text",
                               (accepted.body.decode("utf-8"), accepted.record.occurred_at, accepted.record.source,
                                accepted.record.id, accepted.record.type, accepted.message_key))
    except psycopg.DataError as exc:
        return str(exc).strip()
    return None


async def claim_due_batches(
    conn: psycopg.AsyncConnection, pipelines: list[str], lease_seconds: float, limit: int = 50
) -> list[tuple[UUID, str, int]]:
    """Lease pending batches that are due, so no other consumer submits them meanwhile."""
    cur = await conn.execute(
        """
        UPDATE batches SET next_attempt_at = now() + make_interval(secs => %s)
        WHERE batch_id IN (
            SELECT batch_id FROM batches
            WHERE status = 'pending' AND next_attempt_at <= now() AND pipeline = ANY(%s)
              AND origin = 'consumer' 
            ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED)
        RETURNING batch_id, pipeline, attempts
        """,
        (lease_seconds, pipelines, limit),
    )
    return await cur.fetchall()


# Workers LISTEN on this channel (flows/worker.py): a NOTIFY, payload the work pool, says that
# pool has a new flow run, so its workers look for it at once instead of at their next poll.
FLOW_RUN_CREATED_CHANNEL = "ingest_flow_run_created"

# Announces a new flow run of a work pool to its workers; sent only on commit.
_ANNOUNCE = f"pg_notify('{FLOW_RUN_CREATED_CHANNEL}', %(work_pool)s)::text"

# A batch is submitted once its flow run exists (by a consumer, or by its backfill run). The
# NOTIFY goes in the same statement, so it costs no round trip; a run created early was
# announced when it was created (announce_flow_run), so its workers need not look again.
MARK_SUBMITTED = f"""
WITH submitted AS (
    UPDATE batches SET status = 'submitted', flow_run_id = %(flow_run_id)s, submitted_at = now(),
           attempts = attempts + 1, last_error = NULL
    WHERE batch_id = %(batch_id)s AND status = 'pending'
    RETURNING created_at
)
SELECT extract(epoch FROM now() - created_at), CASE WHEN %(announce)s THEN {_ANNOUNCE} END
FROM submitted
"""


async def mark_submitted(conn: psycopg.AsyncConnection, batch_id: UUID, flow_run_id: UUID,
                         work_pool: str, announce: bool = True) -> float | None:
    """Record the batch's flow run and (`announce`) wake the workers of its work pool; return
    the seconds since its commit (None if it was submitted already: its run was announced then)."""
    row = await (await conn.execute(MARK_SUBMITTED, {
        "batch_id": batch_id, "flow_run_id": flow_run_id, "work_pool": work_pool, "announce": announce,
    })).fetchone()
    return None if row is None else float(row[0])


async def announce_flow_run(conn: psycopg.AsyncConnection, work_pool: str) -> None:
    """Wake the workers of `work_pool`: it has a new flow run (one created before its batch's commit)."""
    await conn.execute(f"SELECT {_ANNOUNCE}", {"work_pool": work_pool})


async def backlog(conn: psycopg.AsyncConnection, pipelines: list[str]) -> dict[str, tuple[int, float]]:
    """Per pipeline: batches without a flow run yet, and the age in seconds of the oldest
    record not processed yet (0 if none); for all consumers together."""
    rows = await (await conn.execute(
        f"""SELECT p,
                  (SELECT count(*) FROM batches WHERE status = 'pending' AND pipeline = p),
                  coalesce((SELECT extract(epoch FROM now() - min({PENDING_SINCE})) FROM inbox
                            WHERE status = 'pending' AND pipeline = p), 0)
           FROM unnest(%s::text[]) AS p""",
        (pipelines,))).fetchall()
    return {pipeline: (int(batches), float(age)) for pipeline, batches, age in rows}


async def defer_batch(conn: psycopg.AsyncConnection, batch_id: UUID, error: str, delay_seconds: float) -> None:
    await conn.execute(
        """UPDATE batches SET attempts = attempts + 1, last_error = %s,
               next_attempt_at = now() + make_interval(secs => %s)
           WHERE batch_id = %s AND status = 'pending'""",
        (error[:2000], delay_seconds, batch_id),
    )


def load_unfinished(
    conn: psycopg.Connection, pipeline: str, batch_id: UUID, with_data: bool = True
) -> list[InboxRecord]:
    """The batch's records that are not done (nor skipped) yet: a retried run processes only these."""
    data = "body->'data', (body->>'schema_version')::int" if with_data else "NULL, NULL"
    cur = conn.execute(
        f"""SELECT message_key, source, record_id, type, occurred_at, {data}
            FROM inbox WHERE pipeline = %s AND batch_id = %s AND status NOT IN ('done', 'skipped')
            ORDER BY seq""",
        (pipeline, batch_id),
    )
    return [InboxRecord(*row) for row in cur]


def mark_failed(conn: psycopg.Connection, pipeline: str, failures: dict[str, str], flow_run_id: UUID | None) -> None:
    """`failures`: message key -> error. Done records are never turned back to failed."""
    if not failures:
        return
    with conn.transaction():
        conn.execute(
            """UPDATE inbox SET status = 'failed', error = f.error, attempts = attempts + 1,
                   processed_at = now(), flow_run_id = %s
               FROM unnest(%s::text[], %s::text[]) AS f(message_key, error)
               WHERE inbox.pipeline = %s AND inbox.message_key = f.message_key AND inbox.status <> 'done'""",
            (flow_run_id, list(failures), list(failures.values()), pipeline),
        )
