-- One row per micro-batch a consumer committed; its flow run is created after the commit.
CREATE TABLE batches (
    batch_id        uuid PRIMARY KEY,
    pipeline        text NOT NULL,
    record_count    integer NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'submitted')),
    flow_run_id     uuid,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    submitted_at    timestamptz
);
-- The submitter's sweep: due pending batches, oldest first.
CREATE INDEX batches_pending ON batches (next_attempt_at) WHERE status = 'pending';

-- Every accepted message, deduplicated on its message key, until and after it is processed.
CREATE TABLE inbox (
    pipeline     text NOT NULL,
    message_key  text NOT NULL,
    batch_id     uuid NOT NULL REFERENCES batches (batch_id),
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    source       text NOT NULL,
    record_id    text NOT NULL,
    type         text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    body         jsonb NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    error        text,
    attempts     integer NOT NULL DEFAULT 0,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    flow_run_id  uuid,
    PRIMARY KEY (pipeline, message_key)
);
CREATE INDEX inbox_batch ON inbox (batch_id);
CREATE INDEX inbox_occurred ON inbox (pipeline, occurred_at);
CREATE INDEX inbox_received ON inbox (pipeline, received_at);
