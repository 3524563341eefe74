"""Prefect tasks and the small reusable steps they are made of (normalize, enrich, store)."""


class RecordRejected(Exception):
    """A record a step refuses for good (e.g. a 4xx from a service): fails that record, not the run."""
