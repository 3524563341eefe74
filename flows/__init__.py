"""Prefect flows: `ingest` (one batch) and the deployments generated from the pipeline config."""
