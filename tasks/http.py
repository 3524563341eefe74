"""A retrying HTTP call for steps: POST JSON, get a JSON object back.

Timeouts, connection errors and 5xx answers are retried with exponential backoff and
jitter; a 4xx answer (or retries running out) raises `Reject` with the response in the
error, so the run lists the record and a later retry of the run tries it again.

    from tasks.http import post_json
    def customer(record):
        return post_json("http://crm.internal/lookup", {"id": record.data["customer"]})
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ingest.steps import Reject

_clients: dict[tuple[str, float], httpx.Client] = {}
_lock = threading.Lock()


class _Transient(Exception):
    pass


def _client(url: str, timeout_seconds: float) -> httpx.Client:
    # One pooled client per service, shared by a step's threads.
    base = str(httpx.URL(url).copy_with(path="/", query=None))
    with _lock:
        if (base, timeout_seconds) not in _clients:
            _clients[(base, timeout_seconds)] = httpx.Client(timeout=timeout_seconds)
        return _clients[(base, timeout_seconds)]


def _excerpt(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} from {response.request.url}: {response.text[:500]!r}"


def _call(client: httpx.Client, url: str, payload: Any) -> dict[str, Any]:
    try:
        response = client.post(url, json=payload)
    except httpx.TransportError as exc:  # timeouts, refused connections, resets
        raise _Transient(f"{type(exc).__name__} calling {url}: {exc}") from exc
    if response.status_code >= 500:
        raise _Transient(_excerpt(response))
    if response.status_code >= 400:
        raise Reject(f"the service refused the record: {_excerpt(response)}")
    try:
        answer = response.json()
    except ValueError:
        raise Reject(f"the service answered non-JSON: {_excerpt(response)}") from None
    if not isinstance(answer, dict):
        raise Reject(f"the service answered a JSON {type(answer).__name__}, not an object")
    return answer


def post_json(url: str, payload: Any, *, timeout_seconds: float = 5.0, retries: int = 3,
              backoff_seconds: float = 0.5) -> dict[str, Any]:
    """POST `payload` as JSON to `url`; the JSON object it answers. Raises Reject (see the module doc)."""
    retrying = Retrying(
        retry=retry_if_exception_type(_Transient),
        wait=wait_random_exponential(multiplier=backoff_seconds, max=30),
        stop=stop_after_attempt(retries + 1),
        reraise=True,
    )
    try:
        return retrying(_call, _client(url, timeout_seconds), url, payload)
    except _Transient as exc:
        raise Reject(f"failed after {retries + 1} attempts: {exc}") from None
