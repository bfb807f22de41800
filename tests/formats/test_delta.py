"""Snorky deltas: the general form and the fast JSON lines ``changefeed run`` writes."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from database_values import postgres_values as _postgres_values

from changefeed import UNCHANGED
from changefeed.formats.codec import dumps, dumps_line


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
        Change(Operation.INSERT, "public.values", new=_postgres_values()),
        Change(Operation.DELETE, "public.values", new=None, old=_postgres_values()),
        Change(Operation.UPDATE, "public.values", new={**_postgres_values(), "big": UNCHANGED},
               old={"id": 1}),
    ]


def test_update_deltas_name_the_columns_not_sent():
    from changefeed import Change, Operation
    from changefeed.formats.delta import delta_of

    change = Change(Operation.UPDATE, "public.t", new={"id": 1, "a": UNCHANGED, "b": UNCHANGED},
                    old={"id": 1}, key={"id": 1})
    assert delta_of(change) == {"type": "update", "model": "t", "newData": {"id": 1},
                                "oldData": {"id": 1}, "unchanged": ["a", "b"]}
    assert "unchanged" not in delta_of(Change(Operation.UPDATE, "public.t", new={"id": 1}))


@pytest.mark.parametrize("model", [None, "Task", 'Odd "model" ✓'])
def test_the_fast_delta_lines_equal_the_general_encoding(model):
    from changefeed.formats.delta import delta_line_encoder, delta_of

    encode = delta_line_encoder(model)
    for change in _changes() * 2:  # the second time from the per-table starts made the first
        line = encode(change)
        assert line == dumps_line(delta_of(change, model)), change
        assert json.loads(line) == json.loads(dumps(delta_of(change, model)))
