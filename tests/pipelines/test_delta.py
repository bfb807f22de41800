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



def _changes():
    from changefeed import Change, Operation

    row = {"id": 7, "title": "naïve \"quote\"", "amount": Decimal("1.50"),
           "at": datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "tags": ["a", None]}
    return [
        Change(Operation.INSERT, "public.tasks", new=row, key={"id": 7}),
        Change(Operation.INSERT, "tasks", new={}),
        Change(Operation.INSERT, "app.line_items", new={"id": uuid.UUID(int=1)}),
        Change(Operation.UPDATE, "public.tasks", new={**row, "body": UNCHANGED},
               old={"id": 7}, key={"id": 7}),
        Change(Operation.DELETE, "public.tasks", new=None, old={"id": 7}, key={"id": 7}),
        Change(Operation.DELETE, "public.tasks", new=None, old=None),
        Change(Operation.INSERT, "public.tasks", new={1: "an int key", "b": b"\x00"}),
        Change(Operation.DELETE, "public.tasks", new=None, old={2: "an int key"}),
    ]


@pytest.mark.parametrize("model", [None, "Task", 'Odd "model" ✓'])
def test_the_fast_delta_lines_equal_the_general_encoding(model):
    from changefeed.pipelines.delta import delta_line_encoder, to_delta

    encode = delta_line_encoder(model)
    for change in _changes() * 2:  # the second time from the per-table starts made the first
        line = encode(change)
        assert line == dumps_line(to_delta(change, model)), change
        assert json.loads(line) == json.loads(dumps(to_delta(change, model)))
