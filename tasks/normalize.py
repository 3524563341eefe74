"""Normalize the envelope fields the sink indexes; `data` is never touched (stored as sent)."""

from __future__ import annotations

import dataclasses
import unicodedata
from datetime import timezone

from ingest.inbox import InboxRecord
from tasks import RecordRejected


def normalize(record: InboxRecord) -> InboxRecord:
    """UTC timestamps and canonical type names (`Order.Created ` -> `order.created`)."""
    type_ = unicodedata.normalize("NFC", record.type).strip().lower()
    if not type_:
        raise RecordRejected(f"type {record.type!r} is blank")
    return dataclasses.replace(
        record,
        type=type_,
        occurred_at=record.occurred_at.astimezone(timezone.utc),
    )
