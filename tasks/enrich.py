"""Enrichment over HTTP: POST the record, keep the service's JSON answer.

Timeouts, connection errors and 5xx answers are retried with exponential backoff and
jitter; a 4xx answer (or retries running out) rejects the record with the response in
the error, so the run lists it and a later retry of the run tries it again.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ingest.inbox import InboxRecord
from ingest.pipelines import Enrichment
from tasks import RecordRejected

_clients: dict[str, httpx.Client] = {}
_lock = threading.Lock()


class _Transient(Exception):
    pass


def _client(config: Enrichment) -> httpx.Client:
    url = str(config.url)
    with _lock:
        if url not in _clients:
            _clients[url] = httpx.Client(timeout=config.timeout_seconds)
        return _clients[url]


def _excerpt(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} from {response.request.url}: {response.text[:500]!r}"


def _call(client: httpx.Client, url: str, record: InboxRecord) -> dict[str, Any]:
    payload = {
        "source": record.source,
        "id": record.id,
        "type": record.type,
        "occurred_at": record.occurred_at.isoformat(),
        "data": record.data,
    }
    try:
        response = client.post(url, json=payload)
    except httpx.TransportError as exc:  # timeouts, refused connections, resets
        raise _Transient(f"{type(exc).__name__} calling {url}: {exc}") from exc
    if response.status_code >= 500:
        raise _Transient(_excerpt(response))
    if response.status_code >= 400:
        raise RecordRejected(f"enrichment refused the record: {_excerpt(response)}")
    try:
        answer = response.json()
    except ValueError:
        raise RecordRejected(f"enrichment answered non-JSON: {_excerpt(response)}") from None
    if not isinstance(answer, dict):
        raise RecordRejected(f"enrichment answered a JSON {type(answer).__name__}, not an object")
    return answer


def enrich(record: InboxRecord, config: Enrichment) -> dict[str, Any]:
    client, url = _client(config), str(config.url)
    retrying = Retrying(
        retry=retry_if_exception(lambda e: isinstance(e, _Transient)),
        wait=wait_random_exponential(multiplier=config.backoff_seconds, max=30),
        stop=stop_after_attempt(config.retries + 1),
        reraise=True,
    )
    try:
        return retrying(_call, client, url, record)
    except _Transient as exc:
        raise RecordRejected(f"enrichment failed after {config.retries + 1} attempts: {exc}") from None
