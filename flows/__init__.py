"""Prefect flows: `ingest` (one batch), `backfill` (a window), and their deployments."""
