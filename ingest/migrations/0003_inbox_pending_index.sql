-- Records not processed yet, oldest first: what monitoring asks every few seconds (the age
-- of the oldest one), kept small because a record leaves it once done or failed.
CREATE INDEX inbox_pending ON inbox (pipeline, received_at) WHERE status = 'pending';
