"""Built-in step `enrich`: POST the normalized record to the pipeline's enrichment service
(`[pipelines.<name>.enrich]`) and return its JSON answer (tasks/http.py retries it)."""

from __future__ import annotations

from typing import Any

from ingest.inbox import InboxRecord
from ingest.steps import Reject, step
from tasks.http import post_json

# Calls of one chunk in flight at once: the service's latency, not our CPU, bounds them.
CONCURRENCY = 8


@step(concurrency=CONCURRENCY, retries=0)
def enrich(normalize: InboxRecord, pipeline) -> dict[str, Any]:
    config = pipeline.enrich
    if config is None:
        raise Reject(f"pipeline {pipeline.name!r} has step enrich but no [pipelines.{pipeline.name}.enrich] table")
    payload = {
        "source": normalize.source,
        "id": normalize.id,
        "type": normalize.type,
        "occurred_at": normalize.occurred_at.isoformat(),
        "data": normalize.data,
    }
    try:
        return post_json(str(config.url), payload, timeout_seconds=config.timeout_seconds, retries=config.retries,
                         backoff_seconds=config.backoff_seconds)
    except Reject as exc:
        raise Reject(f"enrichment: {exc}") from None
