"""JSON encoding of database values, shared by the CLI and every sink."""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from changefeed import UNCHANGED
from changefeed.pipelines.delta import dumps, dumps_line


def test_database_values_have_a_faithful_json_form():
    value = {
        "numeric": Decimal("12345678901234567890.000000001"),
        "at": datetime(2030, 1, 2, 3, 4, 5, 250000, tzinfo=timezone.utc),
        "day": date(1999, 12, 31),
        "clock": time(23, 59, 1),
        "id": uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
        "bytes": b"\xde\xad\xbe\xef",
        "tags": {"a"},
        "pair": (1, 2),
        "nested": {"kept": UNCHANGED},
        "gap": timedelta(seconds=90),
    }
    assert json.loads(dumps(value)) == {
        "numeric": "12345678901234567890.000000001",  # a string: a JSON number loses digits
        "at": "2030-01-02T03:04:05.250000+00:00",
        "day": "1999-12-31",
        "clock": "23:59:01",
        "id": "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "bytes": "3q2+7w==",
        "tags": ["a"],
        "pair": [1, 2],
        "nested": {"kept": None},
        "gap": "0:01:30",
    }


@pytest.mark.parametrize("encode", [dumps, dumps_line])
def test_keys_that_are_not_strings_still_encode(encode):
    # The fast path refuses them; the fallback gives them their JSON string form.
    assert json.loads(encode({1: "a", "b": {2: Decimal("1.5")}})) == {"1": "a", "b": {"2": "1.5"}}


def test_dumps_line_is_one_line():
    line = dumps_line({"type": "insert", "model": "Task", "data": {"title": "two\nlines"}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1

