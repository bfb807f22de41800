"""What crosses to a pipeline's worker processes (`_Chunk`, pickled in a compact form) comes out
as it went in: every kind of entry, item and position, with their types."""

from __future__ import annotations

import pickle
from datetime import datetime, timezone
from decimal import Decimal

from changefeed.backends.postgres.position import PgPosition
from changefeed.change import UNCHANGED, Change, Operation, SnapshotState
from changefeed.message import Message
from changefeed.pipelines._steps import _Chunk, _Entry

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
    return a == b


def test_every_kind_of_entry_crosses_as_it_was():
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
