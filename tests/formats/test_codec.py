"""JSON encoding of database values (`changefeed.formats.codec`), shared by the CLI and sinks."""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest
from database_values import postgres_values as _postgres_values

from changefeed import UNCHANGED
from changefeed.formats.codec import dumps, dumps_line


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


def test_postgres_values_have_an_exact_unambiguous_json_form():
    line = dumps(_postgres_values())
    assert line == (
        b'{"id":1,"nan":"NaN","inf":["Infinity",1.5],"ninf":"-Infinity","date":"infinity",'
        b'"interval":"P1Y2M-3DT-0.5S",'
        b'"json":{"n":1.0000000000000000001,"i":1180591620717411303424,"s":"x"},'
        b'"top":-1180591620717411303424,"raw":{"a":  1},"timetz":"12:30:00-05:30",'
        b'"range":{"lower":1,"upper":5,"bounds":"[)"},"empty":{"empty":true},'
        b'"half":{"lower":null,"upper":5,"bounds":"()"},'
        b'"multi":[{"lower":"1.5","upper":null,"bounds":"[)"}],'
        b'"inet":"10.1.2.3","net":"10.1.2.3/8","v6":"::1","composite":{"at":"24:00:00"}}'
    )


def test_postgres_value_types_survive_pickling():
    import pickle

    values = _postgres_values()
    again = pickle.loads(pickle.dumps(values))
    assert dumps(again) == dumps(values)
    assert again["date"].type == "date" and type(again["interval"]) is type(values["interval"])
