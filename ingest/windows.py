"""A window of records to reprocess: choosing them, counting them, regrouping them into batches.

Used by the `backfill` flow (flows/backfill.py) and by `ingest backfill --dry-run`
(ingest/cli/backfill.py, which only counts).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

import psycopg

from ingest.inbox import STUCK

Mode = Literal["failed", "all"]
TimeField = Literal["occurred", "received"]

# Serialises two attempts of the same backfill run (a retry racing a crashed original).
_ASSIGN_LOCK = 0x8ACF111


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    by: TimeField = "occurred"

    def __post_init__(self):
        if self.start >= self.end:
            raise ValueError(f"empty window: start {self.start.isoformat()} is not before end {self.end.isoformat()}")

    @property
    def column(self) -> str:
        return "occurred_at" if self.by == "occurred" else "received_at"

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()}) by {self.by}_at"


def retention_note(window: Window, retention_days: int, now: datetime) -> str | None:
    """What to tell whoever backfills a window reaching past the inbox's retention
    (ingest/retention.py): its older records may be gone, so "nothing to do" would mislead."""
    horizon = now - timedelta(days=retention_days)
    if window.start >= horizon:
        return None
    return (f"records that arrived more than {retention_days} days ago (before {horizon:%Y-%m-%d %H:%M} UTC, "
            f"inbox_retention_days) may have been deleted from the inbox once processed: "
            f"a backfill of {window} cannot reprocess those")


def previous_day(now: datetime) -> tuple[datetime, datetime]:
    """The UTC day before `now`: the default window of a scheduled backfill."""
    today = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1), today


def _candidates_sql(window: Window, mode: Mode) -> str:
    # failed mode: records that failed, and records still pending long after they arrived
    # (their batch never got a run, or its run crashed or was lost).
    condition = "" if mode == "all" else f"AND (status = 'failed' OR ({STUCK}))"
    return f"""FROM inbox WHERE pipeline = %(pipeline)s
               AND {window.column} >= %(start)s AND {window.column} < %(end)s {condition}"""


def _params(pipeline: str, window: Window, stuck_after_seconds: float) -> dict:
    return {"pipeline": pipeline, "start": window.start, "end": window.end, "stuck": stuck_after_seconds}


def count_candidates(
    conn: psycopg.Connection, pipeline: str, window: Window, mode: Mode, stuck_after_seconds: float
) -> dict[str, int]:
    """Candidates by inbox status, without changing anything."""
    rows = conn.execute(
        f"SELECT status, count(*) {_candidates_sql(window, mode)} GROUP BY status",
        _params(pipeline, window, stuck_after_seconds),
    ).fetchall()
    return dict(rows)


def assign_batches(
    conn: psycopg.Connection,
    pipeline: str,
    origin: str,
    window: Window,
    mode: Mode,
    stuck_after_seconds: float,
    batch_size: int,
) -> list[uuid.UUID]:
    """Regroup the candidates into new batches owned by `origin`; return their ids in order.

    Runs once per origin (one backfill run): if the origin already has batches (the run is
    being retried), they are returned as they are and nothing is selected again.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_ASSIGN_LOCK, origin))
        existing = conn.execute(
            "SELECT batch_id FROM batches WHERE origin = %s ORDER BY created_at, batch_id", (origin,)
        ).fetchall()
        if existing:
            return [row[0] for row in existing]
        keys = [row[0] for row in conn.execute(
            f"SELECT message_key {_candidates_sql(window, mode)} ORDER BY seq",
            _params(pipeline, window, stuck_after_seconds),
        )]
        batch_ids = []
        for index in range(0, len(keys), batch_size):
            chunk = keys[index : index + batch_size]
            batch_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{origin}:{index // batch_size}")
            conn.execute(
                """INSERT INTO batches (batch_id, pipeline, record_count, origin, next_attempt_at)
                   VALUES (%s, %s, %s, %s, 'infinity')""",
                (batch_id, pipeline, len(chunk), origin),
            )
            # 'pending' again, so the ingest flow processes done records too (mode all);
            # pending since now, so that monitoring does not take them for stuck.
            conn.execute(
                """UPDATE inbox SET batch_id = %s, status = 'pending', requeued_at = now()
                   WHERE pipeline = %s AND message_key = ANY(%s)""",
                (batch_id, pipeline, chunk),
            )
            batch_ids.append(batch_id)
        return batch_ids
