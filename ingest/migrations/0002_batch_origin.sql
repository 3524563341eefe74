-- Who made a batch: 'consumer', or 'backfill:<flow run id>' for the batches a backfill run
-- regrouped records into. Consumers submit only their own batches; a backfill owns its.
ALTER TABLE batches ADD COLUMN origin text NOT NULL DEFAULT 'consumer';
CREATE INDEX batches_origin ON batches (origin) WHERE origin <> 'consumer';
