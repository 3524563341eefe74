"""The shipped `records` pipeline's row: the envelope's type, its data exactly as sent, the
enrichment's answer (if the pipeline has one), in the table `sink_table` names."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ingest.inbox import InboxRecord
from ingest.sinks import FromInbox


class RecordRow(BaseModel):
    type: str
    data: FromInbox = None  # the inbox's copy: numbers keep their exact text
    enrichment: dict[str, Any] | None = None


def row(normalize: InboxRecord) -> RecordRow:
    return RecordRow(type=normalize.type)


def enriched_row(normalize: InboxRecord, enrich: dict[str, Any]) -> RecordRow:
    return RecordRow(type=normalize.type, enrichment=enrich)
