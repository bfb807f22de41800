"""How a pipeline's entries cross a process boundary (the multi-process mode, `_processes`).

A `_Chunk` of entries is pickled compactly: each entry as a tag and a few values that pickle
writes and reads in C (`pack_entries`, `unpack_entries`), never a `Change`, enum or position
object as itself (their own pickling hooks run in Python, ~25 µs a change each way, more than
the stages cost). A batch of lines the feed wrote itself (`Lines`, `ChangeFeed.prefer_lines`)
crosses as two bytes objects, its text and its line ends, however many changes it holds. The
functions here are the reference; the kernels (`entries.pxi`) do the same in C where the
extension is built, with the same packed form.
"""

from __future__ import annotations

from typing import Any

import changefeed._speedups as _speedups
from changefeed._speedups import Lines
from changefeed.change import Change, Operation
from changefeed.pipelines._steps import _Entry, _Failure
from changefeed.pipelines.sinks import JsonLine


class _Chunk:
    """Entries crossing a process boundary; ``flush`` asks the sink to deliver at once.

    ``seq`` numbers the chunks the feed's process sends (0, 1, ...): copies of a worker process
    (``own_process(stage, workers=N)``) finish them in any order, and the next single process
    puts them back in that order (`InOrder`). ``failure``: a stage failed on the change after
    these entries (it travels with them, so that it is raised after them, in order).

    Pickled compactly (`pack_entries`): no `Change`, enum or position object is pickled as
    itself (their own hooks run in Python, ~25 µs a change each way, more than the stages), and
    a `JsonLine` crosses as its bytes. The kernels pack and unpack where they are built."""

    __slots__ = ("entries", "flush", "changes", "keep_change", "seq", "failure")

    def __init__(self, entries: list[_Entry], flush: bool, seq: int = 0,
                 failure: _Failure | None = None) -> None:
        self.entries = entries
        self.flush = flush
        self.changes: list[Any] | None = None
        self.seq = seq
        self.failure = failure

    @classmethod
    def of_changes(cls, changes: list[Any], keep_change: bool, flush: bool) -> _Chunk:
        """The chunk of ``_Entry(change, keep_change)`` for each of ``changes``, packed without
        making those entries (the feed's process runs no stage: it only sends)."""
        chunk = cls([], flush)
        chunk.changes = changes
        chunk.keep_change = keep_change
        return chunk

    def __len__(self) -> int:
        return len(self.changes if self.changes is not None else self.entries)

    def __getstate__(self) -> tuple[bytes, list[Any], bool, int, _Failure | None]:
        if self.changes is not None:
            tags, values = pack_changes(self.changes, self.keep_change)
        else:
            tags, values = pack_entries(self.entries)
        return tags, values, self.flush, self.seq, self.failure

    def __setstate__(self, state: tuple[bytes, list[Any], bool, int, _Failure | None]) -> None:
        tags, values, self.flush, self.seq, self.failure = state
        self.entries = unpack_entries(tags, values)
        self.changes = None


class InOrder:
    """Puts chunks back in the order of their ``seq`` (the feed's), from copies of a process
    that finish them in any order: a chunk that comes early waits until those before it came.
    What waits is bounded by what the feed's process lets be in flight."""

    __slots__ = ("next", "early")

    def __init__(self) -> None:
        self.next = 0
        self.early: dict[int, _Chunk] = {}

    def __len__(self) -> int:
        return len(self.early)

    def add(self, chunk: _Chunk) -> list[_Chunk]:
        """The chunks now in order, ``chunk`` and those that waited for it (none if it is
        early)."""
        if chunk.seq != self.next:
            self.early[chunk.seq] = chunk
            return []
        ready = [chunk]
        self.next += 1
        early = self.early
        while early:
            waiting = early.pop(self.next, None)
            if waiting is None:
                break
            ready.append(waiting)
            self.next += 1
        return ready


# How `pack_entries` writes an entry: a tag, then its values in one flat list.
_CHANGE_TAG = 0
"""Its only item is a `Change` holding the entry's position; the change is not kept (for dead
letters): the change's 11 fields, its operation as its number, its position packed."""
_KEPT_TAG = 1
"""The same, the change kept as the entry's change."""
_LINE_TAG = 2
"""Its only item is a `JsonLine`; the change is not kept: the position packed, the line's bytes."""
_OTHER_TAG = 3
"""Anything else: one value, `_pack_other`'s tuple."""


def _pack_entries(entries: list[_Entry]) -> tuple[bytes, list[Any]]:
    """``entries`` as tags (one per entry) and a flat list of values, all of which pickle in C:
    `_Chunk`'s state. The reference of the kernels' ``pack_entries``."""
    tags = bytearray()
    values: list[Any] = []
    for entry in entries:
        items, change = entry.items, entry.change
        if len(items) == 1 and not entry.dead:
            item = items[0]
            cls = item.__class__
            if cls is Change and item.position is entry.position and (
                    change is None or change is item):
                tags.append(_CHANGE_TAG if change is None else _KEPT_TAG)
                values += (item.operation._value_, item.table, item.new, item.old, item.key,
                           _pack(item.position), item.committed_at, item.transaction,
                           item.snapshot, item.meta, item.schema_version)
                continue
            if cls is JsonLine and change is None:
                tags.append(_LINE_TAG)
                values += (_pack(entry.position), item.line)
                continue
        tags.append(_OTHER_TAG)
        values.append(_pack_other(entry))
    return bytes(tags), values


def _pack_changes(changes: list[Any], keep_change: bool) -> tuple[bytes, list[Any]]:
    """``_pack_entries([_Entry(change, keep_change) for change in changes])``, without making
    the entries. The reference of the kernels' ``pack_changes``."""
    tags = bytearray()
    values: list[Any] = []
    for change in changes:
        if change.__class__ is Change:
            tags.append(_KEPT_TAG if keep_change else _CHANGE_TAG)
            values += (change.operation._value_, change.table, change.new, change.old,
                       change.key, _pack(change.position), change.committed_at,
                       change.transaction, change.snapshot, change.meta, change.schema_version)
        else:
            tags.append(_OTHER_TAG)
            values.append(_pack_other(_Entry(change, keep_change)))
    return bytes(tags), values


def _unpack_entries(tags: bytes, values: list[Any]) -> list[_Entry]:
    """The entries `_pack_entries` packed. The reference of the kernels' ``unpack_entries``."""
    entries: list[_Entry] = []
    new_entry = _Entry.__new__
    at = 0
    for tag in tags:
        if tag == _OTHER_TAG:
            entries.append(_unpack_other(values[at]))
            at += 1
            continue
        entry = new_entry(_Entry)
        entry.dead = []
        if tag == _LINE_TAG:
            entry.position = _unpack(values[at])
            entry.change = None
            entry.items = [JsonLine(values[at + 1])]
            entries.append(entry)
            at += 2
            continue
        (operation, table, new, old, key, position, committed_at, transaction, snapshot, meta,
         schema_version) = values[at:at + 11]
        at += 11
        change = Change(_OPERATIONS[operation], table, new, old, key, _unpack(position),
                        committed_at, transaction, snapshot, meta, schema_version)
        entry.position = change.position
        entry.change = change if tag == _KEPT_TAG else None
        entry.items = [change]
        entries.append(entry)
    return entries


def _pack_other(entry: _Entry) -> tuple[Any, ...]:
    change = entry.change
    same = change is not None and bool(entry.items) and entry.items[0] is change
    return (_pack(entry.position), _pack(change), same,
            [_pack(item) for item in entry.items[same:]], entry.dead)


def _unpack_other(packed: tuple[Any, ...]) -> _Entry:
    entry = _Entry.__new__(_Entry)
    position, change, same, items, entry.dead = packed
    entry.position, entry.change = _unpack(position), _unpack(change)
    entry.items = [_unpack(item) for item in items]
    if same:
        entry.items.insert(0, entry.change)  # one object, as before
    return entry


# The packed forms of a value (`_pack`), told apart by their lengths: itself (a str, None), a
# 1-tuple (any other value, pickled as it is), a `JsonLine` (2), a text (3), a batch of ready
# lines (7: `Lines`, its text and line ends as two bytes objects), a Change (12).
_CHANGE, _TEXT, _LINE, _LINES = 0, 1, 2, 3
_OPERATIONS = {operation.value: operation for operation in Operation}
_TEXT_CLASSES: dict[type, bool] = {}


def _pack(value: Any) -> Any:
    """``value`` in a form pickle writes and reads in C (see `_Chunk`)."""
    cls = value.__class__
    if cls is Change:
        return (_CHANGE, value.operation._value_, value.table, value.new, value.old, value.key,
                _pack(value.position), value.committed_at, value.transaction, value.snapshot,
                value.meta, value.schema_version)
    if cls is str or value is None:
        return value
    if cls is JsonLine:
        return (_LINE, value.line)
    if cls is Lines:  # only made where the kernels are built
        return (_LINES, *_speedups.kernels.pack_lines(value))
    text_only = _TEXT_CLASSES.get(cls)
    if text_only is None:  # a str subclass whose instances hold nothing but their text
        text_only = _TEXT_CLASSES[cls] = issubclass(cls, str) and "__dict__" not in dir(cls)
    if text_only:
        return (_TEXT, cls, str(value))
    return (value,)


def _unpack(packed: Any) -> Any:
    if packed.__class__ is not tuple:
        return packed
    size = len(packed)
    if size == 1:
        return packed[0]
    if size == 2:
        return JsonLine(packed[1])
    if size == 3:
        return str.__new__(packed[1], packed[2])
    if size == 7:
        return _speedups.kernels.unpack_lines(*packed[1:])
    (_, operation, table, new, old, key, position, committed_at, transaction, snapshot, meta,
     schema_version) = packed
    return Change(_OPERATIONS[operation], table, new, old, key, _unpack(position),
                  committed_at, transaction, snapshot, meta, schema_version)


def _compiled(name: str, reference: Any) -> Any:
    kernels = _speedups.kernels
    if kernels is None or not hasattr(kernels, name):
        return reference
    compiled = getattr(kernels, name)
    return lambda *args: compiled(*args, _Entry, JsonLine, _pack, _unpack, _pack_other,
                                  _unpack_other)


pack_entries = _compiled("pack_entries", _pack_entries)
pack_changes = _compiled("pack_changes", _pack_changes)
unpack_entries = _compiled("unpack_entries", _unpack_entries)


