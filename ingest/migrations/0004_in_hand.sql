-- Redelivered messages a consumer is handling right now, so that the one a consumer died
-- with is known when it comes back (consumers/poison.py). Rows live for milliseconds; a
-- row left behind names a message that crashed a consumer. Unlogged: it must outlive a
-- consumer, not a database crash.
CREATE UNLOGGED TABLE in_hand (
    pipeline    text NOT NULL,
    message_key text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, message_key)
);
