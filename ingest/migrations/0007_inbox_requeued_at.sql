-- When a backfill set a record back to 'pending' (ingest/windows.py): its age as a pending
-- record counts from then, not from its arrival, or every backfill of old records would
-- look stuck (`inbox.stuck`, `ingest_inbox_oldest_pending_seconds`). NULL: never requeued.
ALTER TABLE inbox ADD COLUMN requeued_at timestamptz;
