"""Inbox retention: deleting what is settled and old, a little at a time.

The inbox keeps a full copy of every message; a pipeline's `inbox_retention_days` bounds
it. Only settled records go (done or skipped: a failed or pending one is still work to
do), then the batches no record refers to any more. Deleting runs in transactions of
`chunk` rows each, so it never holds locks long enough to stall consumers or flow runs,
and an interrupted run loses nothing: the next one carries on. The sink's `inbox_seq`
lineage keeps the numbers of deleted rows (no foreign key on purpose); `inbox.batch_id`
does reference batches, which is why records go first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)

CHUNK = 1000

# Oldest first by arrival (index inbox_received); SKIP LOCKED leaves rows a flow run is
# updating right now to the next run.
_DELETE_RECORDS = """
DELETE FROM inbox WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM inbox
    WHERE pipeline = %(pipeline)s AND received_at < now() - make_interval(days => %(days)s)
      AND status IN ('done', 'skipped')
    ORDER BY received_at LIMIT %(chunk)s FOR UPDATE SKIP LOCKED))
"""

# A batch is finished once none of its records is left: all were deleted above, or a
# backfill regrouped them into batches of its own. Old batches never gain records (a
# consumer's batch gets its rows in the transaction that creates it, a backfill makes new
# ones), so one with none left and older than the horizon is gone for good.
_DELETE_BATCHES = """
DELETE FROM batches WHERE batch_id = ANY(ARRAY(
    SELECT batch_id FROM batches b
    WHERE pipeline = %(pipeline)s AND created_at < now() - make_interval(days => %(days)s)
      AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.batch_id = b.batch_id)
    LIMIT %(chunk)s FOR UPDATE SKIP LOCKED))
"""


@dataclass
class Purged:
    records: int = 0
    batches: int = 0
    transactions: int = 0


def purge(conn: psycopg.Connection, pipeline: str, retention_days: int, chunk: int = CHUNK) -> Purged:
    """Delete `pipeline`'s settled records and finished batches older than `retention_days`.

    `conn` must be in autocommit mode: each chunk is its own transaction.
    """
    if not conn.autocommit:
        raise ValueError("purge() needs an autocommit connection: one transaction per chunk")
    purged = Purged()
    params = {"pipeline": pipeline, "days": retention_days, "chunk": chunk}
    for statement, field in ((_DELETE_RECORDS, "records"), (_DELETE_BATCHES, "batches")):
        while True:
            with conn.transaction():
                deleted = conn.execute(statement, params).rowcount
            purged.transactions += 1
            setattr(purged, field, getattr(purged, field) + deleted)
            if deleted < chunk:
                break
    log.info("retention of %s (%d days): deleted %d inbox record(s) and %d batch(es) in %d transaction(s)",
             pipeline, retention_days, purged.records, purged.batches, purged.transactions)
    return purged
