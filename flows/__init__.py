"""The Prefect side: flows `ingest` (one batch) and `backfill` (a window), their deployments,
the fork server that starts flow-run processes warm, what their engine does
not do (engine_tuning), the recording window, and retrying
flow runs in bulk (retry_runs, for `ingest replay runs`)."""
