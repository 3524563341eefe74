"""normalize(): canonical type, UTC timestamp; everything else passes through untouched."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from ingest.inbox import InboxRecord
from tasks import RecordRejected
from tasks.normalize import normalize

PLUS_TWO = timezone(timedelta(hours=2))


def inbox_record(**changes) -> InboxRecord:
    fields = {
        "message_key": "id:m-1",
        "source": "Shop",
        "id": "Order-42",
        "type": "order.created",
        "occurred_at": datetime(2024, 5, 1, 14, 0, tzinfo=PLUS_TWO),
        "data": {"Total": 10, "Note": " Keep  Me "},
    }
    return InboxRecord(**{**fields, **changes})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Order.Created", "order.created"),
        ("  Order.Created \n", "order.created"),
        ("\tUSER.SIGNED_UP\t", "user.signed_up"),
        ("order.created", "order.created"),
        ("Cafe\u0301.Opened", "caf\u00e9.opened"),
    ],
)
def test_type_is_lowercased_and_stripped(raw, expected):
    assert normalize(inbox_record(type=raw)).type == expected


def test_occurred_at_becomes_utc():
    result = normalize(inbox_record())

    assert result.occurred_at == datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert result.occurred_at.utcoffset() == timedelta(0)
    assert result.occurred_at.hour == 12


def test_other_fields_are_untouched():
    record = inbox_record()

    result = normalize(record)

    assert result.data is record.data
    assert result.data == {"Total": 10, "Note": " Keep  Me "}
    assert result.source == "Shop"
    assert result.id == "Order-42"
    assert result.message_key == "id:m-1"
    assert result.key == "Shop/Order-42"


def test_input_record_is_not_modified():
    record = inbox_record(type=" Order.Created ")

    normalize(record)

    assert record.type == " Order.Created "
    assert record.occurred_at.utcoffset() == timedelta(hours=2)


def test_record_without_data_is_fine():
    assert normalize(inbox_record(data=None)).data is None


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_blank_type_is_rejected(blank):
    with pytest.raises(RecordRejected) as info:
        normalize(inbox_record(type=blank))

    assert "blank" in str(info.value)
    assert repr(blank) in str(info.value)
