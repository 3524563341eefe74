-- no transaction
-- Pending records by the time they became pending (arrival, or a backfill's requeue):
-- what monitoring asks every few seconds and `inbox.stuck` counts. It replaces
-- inbox_pending (by arrival alone). Built concurrently: consumers keep inserting meanwhile.
DROP INDEX CONCURRENTLY IF EXISTS inbox_pending_since;
CREATE INDEX CONCURRENTLY inbox_pending_since ON inbox (pipeline, (coalesce(requeued_at, received_at)))
    WHERE status = 'pending';
DROP INDEX CONCURRENTLY IF EXISTS inbox_pending;
