"""Timestamps as operators type them: ISO 8601, taken as UTC when they carry no offset."""

from __future__ import annotations

from datetime import datetime, timezone


def as_utc(value: datetime) -> datetime:
    """Naive datetimes are taken as UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 date or date-time (e.g. 2024-05-01, 2024-05-01T06:00:00Z); ValueError if it is neither."""
    return as_utc(datetime.fromisoformat(text))
