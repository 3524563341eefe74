"""Store records in the sink and mark them done in the inbox, in one statement (so one transaction).

The upsert keeps, per record key, the version with the newest occurred_at (ties: the one
that arrived last), whatever order batches and retries run in; so storing a record twice,
or an old version after a new one, never changes the result.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg import sql

from ingest.inbox import InboxRecord

# data comes from the inbox, where PostgreSQL parsed the original body: it never passes
# through Python, so it is stored exactly as sent. DISTINCT ON collapses duplicates
# inside one statement (ON CONFLICT cannot touch a row twice). Arrays go in binary (%b):
# psycopg escapes text arrays with a regular expression per element. One statement, not a
# transaction of two: with `record` granularity this runs once per record, and a single
# round trip instead of four (BEGIN, upsert, update, COMMIT) is most of its cost.
_STORE = """
WITH input AS (
    SELECT * FROM unnest(%(keys)b::text[], %(types)b::text[], %(occurred)b::timestamptz[], %(enrichments)b::jsonb[])
        AS t(message_key, type, occurred_at, enrichment)
), latest AS (
    SELECT DISTINCT ON (i.source, i.record_id)
           i.source, i.record_id, t.type, t.occurred_at, i.body -> 'data' AS data, t.enrichment, i.seq
    FROM input t JOIN inbox i ON i.pipeline = %(pipeline)s AND i.message_key = t.message_key
    ORDER BY i.source, i.record_id, t.occurred_at DESC, i.seq DESC
), done AS (
    UPDATE inbox SET status = 'done', error = NULL, attempts = attempts + 1, processed_at = now(),
           flow_run_id = %(flow_run_id)s
    WHERE pipeline = %(pipeline)s AND message_key = ANY(ARRAY(SELECT message_key FROM input))
)
INSERT INTO {sink} AS r (source, id, type, occurred_at, data, enrichment, ingested_at, flow_run_id, inbox_seq)
SELECT source, record_id, type, occurred_at, data, enrichment, now(), %(flow_run_id)s, seq FROM latest
ON CONFLICT (source, id) DO UPDATE SET
    type = EXCLUDED.type, occurred_at = EXCLUDED.occurred_at, data = EXCLUDED.data,
    enrichment = EXCLUDED.enrichment, ingested_at = EXCLUDED.ingested_at,
    flow_run_id = EXCLUDED.flow_run_id, inbox_seq = EXCLUDED.inbox_seq
WHERE (r.occurred_at, r.inbox_seq) <= (EXCLUDED.occurred_at, EXCLUDED.inbox_seq)
"""


def store(
    conn: psycopg.Connection,
    pipeline: str,
    sink_table: str,
    records: list[InboxRecord],
    enrichments: list[dict[str, Any] | None],
    flow_run_id: UUID | None,
) -> None:
    if not records:
        return
    params = {
        "pipeline": pipeline,
        "flow_run_id": flow_run_id,
        "keys": [r.message_key for r in records],
        "types": [r.type for r in records],
        "occurred": [r.occurred_at for r in records],
        "enrichments": [None if e is None else orjson.dumps(e).decode() for e in enrichments],
    }
    conn.execute(sql.SQL(_STORE).format(sink=sql.Identifier(sink_table)), params)
