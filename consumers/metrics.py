"""Prometheus metrics of a consumer process, served on INGEST_METRICS_PORT (+ its index).

Every series is labelled by pipeline. What to alert on is in the README (Monitoring).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RECEIVED = Counter("ingest_messages_received", "Messages delivered to this consumer.", ["pipeline"])
REDELIVERED = Counter(
    "ingest_messages_redelivered",
    "Messages delivered again (a consumer died or lost its channel holding them, or returned them).", ["pipeline"],
)
ACKED = Counter("ingest_messages_acked", "Messages acked after their batch was committed to the inbox.", ["pipeline"])
DEAD_LETTERED = Counter(
    "ingest_messages_dead_lettered", "Messages dead-lettered by this consumer, by reason.", ["pipeline", "reason"]
)
BATCHES_COMMITTED = Counter("ingest_batches_committed", "Batches committed to the inbox (one flow run each).",
                            ["pipeline"])
BATCHES_SUBMITTED = Counter("ingest_batches_submitted", "Batches whose flow run this consumer created.", ["pipeline"])
SUBMIT_FAILURES = Counter(
    "ingest_batch_submit_failures", "Attempts to create a batch's flow run that failed (the batch waits).", ["pipeline"]
)
BATCHES_PENDING = Gauge(
    "ingest_batches_pending",
    "Batches committed whose flow run is not created yet, all consumers together (read from the database).",
    ["pipeline"],
)
OLDEST_PENDING_RECORD = Gauge(
    "ingest_inbox_oldest_pending_seconds",
    "Age of the oldest record accepted but not processed yet (0: none); grows when runs do not complete.",
    ["pipeline"],
)
COMMIT_TO_FLOW_RUN = Histogram(
    "ingest_commit_to_flow_run_seconds", "From a batch's commit to the creation of its flow run.", ["pipeline"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
COMMIT_FAILURES = Counter(
    "ingest_inbox_commit_failures",
    "Attempts to commit a batch to the inbox that failed (its messages are held unacked and the commit retried).",
    ["pipeline"],
)
HELD_BYTES = Gauge(
    "ingest_consumer_held_bytes",
    "Bytes of message bodies this consumer holds: delivered, not yet acked, returned or dead-lettered "
    "(at most its part of INGEST_CONSUMER_MAX_HELD_BYTES).", ["pipeline"],
)
INBOX_WRITE = Histogram(
    "ingest_inbox_write_seconds", "Time to write one batch to the inbox (one transaction).", ["pipeline"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def serve(port: int) -> bool:
    """Serve /metrics on `port` (0: not at all); a port in use costs the metrics, not the consumer."""
    if not port:
        return False
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("metrics not served: port %d: %s", port, exc)
        return False
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
    return True
