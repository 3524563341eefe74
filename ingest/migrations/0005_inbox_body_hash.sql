-- The SHA-256 of each message body as it was received: a message id used again for another
-- body is dead-lettered (reason `id_conflict`) naming both bodies' hashes. NULL for the rows
-- stored before this migration (they are still compared, by their jsonb).
ALTER TABLE inbox ADD COLUMN body_sha256 bytea;
