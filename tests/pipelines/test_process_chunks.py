"""What crosses to a pipeline's worker processes (`_Chunk`, pickled in a compact form) comes out
as it went in: every kind of entry, item, position and value, with their types, whichever
implementation packs it and whichever unpacks it (the kernels' and the Python reference write
the same packed form)."""

from __future__ import annotations

import math
import pickle
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from value_families import every_value_family

from changefeed import _speedups
from changefeed.backends.postgres.position import PgPosition
from changefeed.change import UNCHANGED, Change, Operation, SnapshotState, Truncate
from changefeed.message import Message
from changefeed.pipelines import _crossing
from changefeed.pipelines._crossing import _Chunk
from changefeed.pipelines._steps import _Entry
from changefeed.pipelines.sinks import JsonLine

WHEN = datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)


class Label(str):
    """A str subclass with state of its own: it must travel as pickle makes it travel."""

    def __new__(cls, text: str, note: str) -> Label:
        made = super().__new__(cls, text)
        made.note = note
        return made

    def __reduce__(self) -> tuple[object, ...]:
        return Label, (str(self), self.note)


def change(position: object, operation: Operation = Operation.INSERT, **fields: object) -> Change:
    return Change(operation, "public.t", {"id": 1, "n": Decimal("1.50"), "big": UNCHANGED},
                  {"id": 0}, {"id": 1}, position, WHEN, 726, True, {"m": 1}, "v1", **fields)


def entry(item: object, keep: bool, items: list[object] | None = None,
          dead: bool = False) -> _Entry:
    made = _Entry(item, keep)
    if items is not None:
        made.items = items
    if dead:
        made.dead_letter("stage", ValueError("no"))
    return made


def same(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, Change):
        return all(same(getattr(a, name), getattr(b, name)) for name in Change.__slots__)
    if isinstance(a, Label):
        return str(a) == str(b) and a.note == b.note
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (float, Decimal)) and a != a:  # NaN: equal to nothing, itself included
        return b != b and (math.copysign(1, a) == math.copysign(1, b)
                           if isinstance(a, float) else str(a) == str(b))
    return a == b and getattr(a, "__dict__", None) == getattr(b, "__dict__", None)


@pytest.fixture(params=[(pack, unpack) for pack in ("python", "c") for unpack in ("python", "c")],
                ids="-".join)
def implementations(request, monkeypatch):
    """Pack with one implementation, unpack with the other (or the same)."""
    pack, unpack = request.param
    if "c" in request.param and _speedups.kernels is None:
        pytest.skip("the compiled extension is not built (or CHANGEFEED_IMPL=python)")
    compiled = {"pack": _crossing._compiled("pack_entries", _crossing._pack_entries),
                "changes": _crossing._compiled("pack_changes", _crossing._pack_changes),
                "unpack": _crossing._compiled("unpack_entries", _crossing._unpack_entries)}
    monkeypatch.setattr(_crossing, "pack_entries",
                        compiled["pack"] if pack == "c" else _crossing._pack_entries)
    monkeypatch.setattr(_crossing, "pack_changes",
                        compiled["changes"] if pack == "c" else _crossing._pack_changes)
    monkeypatch.setattr(_crossing, "unpack_entries",
                        compiled["unpack"] if unpack == "c" else _crossing._unpack_entries)
    return pack, unpack


def test_every_kind_of_entry_crosses_as_it_was(implementations):
    position = PgPosition(0x16B3748, 7)
    message = Message("app", b"x", PgPosition(5, 0), False, None, None, 6)
    entries = [
        entry(change(position), keep=False),  # the common case: a change, nothing kept
        entry(change(position), keep=True),  # kept for dead letters
        entry(change("opaque"), keep=False),  # other positions: plain text,
        entry(change({"resume": b"\x00"}), keep=False),  # a resume token,
        entry(change(None), keep=False),  # none,
        entry(change(Label("7", "n")), keep=False),  # a str with state of its own
        entry(change(position, Operation.DELETE), keep=False,
              items=[{"type": "delete", "data": {"id": 1}}]),  # a stage made something else
        entry(change(position, Operation.UPDATE), keep=True, items=[]),  # dropped by a stage
        entry(change(position), keep=True, dead=True),  # dead-lettered
        entry(change(position), keep=False, items=["a", ("b", 2), None, position]),  # several
        entry(message, keep=False),
        entry(change(position), keep=False, items=[JsonLine(b'{"a":1}\n')]),  # a format's line
        entry(change(position), keep=True, items=[JsonLine(b"{}\n")]),  # the same, kept
        entry(change("opaque"), keep=False, items=[JsonLine(b"{}\n"), JsonLine(b"[]\n")]),
        entry(Truncate("public.t", position, WHEN, 726), keep=False),
        entry(SnapshotState("public.t", "done", position), keep=True),
        entry("a prefeed item", keep=True),
    ]
    chunk = pickle.loads(pickle.dumps(_Chunk(entries, flush=True), protocol=5))
    assert chunk.flush is True and len(chunk.entries) == len(entries)
    for sent, got in zip(entries, chunk.entries, strict=True):
        assert same(got.position, sent.position), sent.position
        assert same(got.change, sent.change)
        assert len(got.items) == len(sent.items)
        assert all(same(a, b) for a, b in zip(got.items, sent.items, strict=True))
        assert got.dead == sent.dead
        if sent.change is not None and sent.items and sent.items[0] is sent.change:
            assert got.items[0] is got.change  # still one object
    assert type(chunk.entries[0].items[0].position) is PgPosition
    assert chunk.entries[0].items[0].operation is Operation.INSERT
    assert chunk.entries[0].items[0].new["big"] is UNCHANGED


def test_every_value_family_crosses_exactly(implementations):
    """A change's values are pickled as they are: every family comes back equal, and of its type."""
    row = every_value_family()
    position = PgPosition(0x1234, 2)
    changes = [Change(Operation.INSERT, "public.t", row, None, ("int",), position, WHEN, 9),
               Change(Operation.UPDATE, "public.t", row, dict(row), ("int",), position, WHEN, 9),
               Change(Operation.DELETE, "public.t", None, row, ("int",), position, None, None,
                      True, {"source": "x"}, 3)]
    entries = [entry(one, keep=keep) for one in changes for keep in (False, True)]
    chunk = pickle.loads(pickle.dumps(_Chunk(entries, flush=False), protocol=5))
    for sent, got in zip(entries, chunk.entries, strict=True):
        assert same(got.items[0], sent.items[0])
        assert (got.change is got.items[0]) == (sent.change is not None)
        for column, value in (got.items[0].row or {}).items():
            assert type(value) is type(sent.items[0].row[column]), column


@pytest.mark.skipif(_speedups.kernels is None, reason="the compiled extension is not built")
def test_the_kernels_pack_as_the_python_reference_does():
    position = PgPosition(0x16B3748, 7)
    entries = [entry(change(position), keep=False), entry(change(position), keep=True),
               entry(change(None), keep=False), entry(change("text"), keep=True),
               entry(change(position), keep=False, items=[JsonLine(b"{}\n")]),
               entry(change(position), keep=False, items=[]),
               entry(change(Label("7", "n")), keep=False)]
    compiled = _crossing._compiled("pack_entries", _crossing._pack_entries)
    tags, values = compiled(entries)
    reference_tags, reference_values = _crossing._pack_entries(entries)
    assert tags == reference_tags and same(values, reference_values)
    changes = [change(position), change("text"), Truncate("public.t", position), "x"]
    compiled = _crossing._compiled("pack_changes", _crossing._pack_changes)
    for keep in (False, True):
        tags, values = compiled(changes, keep)
        reference_tags, reference_values = _crossing._pack_changes(changes, keep)
        assert tags == reference_tags and same(values, reference_values)


def test_changes_packed_without_entries_cross_as_their_entries(implementations):
    """The feed's process, running no stage, packs its changes as they are (`_Chunk.of_changes`):
    they arrive as the entries ``_Entry(change, keep)`` would have."""
    position = PgPosition(0x16B3748, 7)
    message = Message("app", b"x", PgPosition(5, 0), False, None, None, 6)
    items = [change(position), change(None), change(Label("7", "n")), message,
             Truncate("public.t", position, WHEN, 726), "a prefeed item",
             SnapshotState("public.t", "done", position), change({"token": b"\x01"})]
    for keep in (False, True):
        chunk = pickle.loads(pickle.dumps(_Chunk.of_changes(items, keep, flush=True), 5))
        assert chunk.flush is True and len(chunk.entries) == len(items)
        for sent, got in zip([_Entry(item, keep) for item in items], chunk.entries, strict=True):
            assert same(got.position, sent.position) and same(got.change, sent.change)
            assert same(got.items, sent.items) and got.dead == []
            if keep:
                assert got.items[0] is got.change
