"""The decoder of pgoutput's TupleData: one row's values, generated per table. Pure.

TupleData is an Int16 column count, then per column a kind byte ('t' text, 'n' NULL, 'u'
unchanged TOAST) and for 't' an Int32 length and the bytes. Decoding it is the innermost loop
of the whole feed, so for each relation `row_decoder` generates the code unrolled (as namedtuple
and dataclasses generate code): no loop counter, no list appends, one struct call per value, the
row built as a dict display. The tests check it against the same parsing written as a plain
loop.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from changefeed.change import UNCHANGED
from changefeed.errors import DecodeError

_INT16 = struct.Struct("!h")
_KIND_AND_LENGTH = struct.Struct("!xi")  # a tuple value's length, after its kind byte

RowLoad = Callable[[Sequence[bytes | None]], Sequence[Any]]
"""Loads one row of text values (None for NULL) into Python values, all at once."""

RowDecoder = Callable[
    [bytes, int], tuple[dict[str, Any], dict[str, Any], int, list[str] | None]
]
"""TupleData at an offset -> (row, key, offset after it, unchanged column names or None)."""

_COLUMN_TEMPLATE = """\
    if data[o] == 116:
        s = o + 5
        o = s + unpack_length(data, o)[0]
        v{i} = data[s:o]{guard}
    elif data[o] == 110:
        v{i} = None
        o += 1
    elif data[o] == 117:
        v{i} = None
        o += 1
        unchanged = (unchanged or []) + [{i}]
    else:
        bad_kind(data[o])
"""


# A guarded column's text ending in a letter (float NaN, Infinity) would load wrongly (as a
# plain float NaN, which JSON turns into null): the row goes to `rescue`.
_GUARD = """
        if data[o - 1] > 57:
            suspect = True"""


def _reraise(raw: Sequence[bytes | None]) -> Sequence[Any]:
    raise  # noqa: PLE0704 - called while handling the loader's exception: re-raise it


def _bad_kind(kind: int) -> None:
    raise DecodeError(f"unknown tuple value kind {chr(kind)!r}")


def row_decoder(
    table: str,
    columns: tuple[str, ...],
    key_names: tuple[str, ...],
    load: RowLoad,
    rescue: RowLoad | None = None,
) -> RowDecoder:
    """The decoder of ``table``'s rows, made once per Relation message: TupleData at an
    offset -> (row dict, key dict, offset after it, unchanged column names or None).

    ``load`` turns the list of raw values into Python values, and ``rescue`` (if given) those
    of a row ``load`` raised on; ``key_names`` are the columns of the key dict (their values,
    as in the row)."""
    count = len(columns)
    guarded = frozenset(getattr(rescue, "guarded", ()))
    values = "".join(f"v{i}, " for i in range(count))
    row = ", ".join(f"{name!r}: v{i}" for i, name in enumerate(columns))
    key = ", ".join(f"{name!r}: v{columns.index(name)}" for name in key_names)
    source = (
        "def decode(data, o):\n"
        "    if data[o:o + 2] != count_bytes:\n"
        "        wrong_count(unpack_count(data, o)[0])\n"
        "    o += 2\n"
        "    unchanged = None\n"
        "    suspect = False\n"
        + "".join(
            _COLUMN_TEMPLATE.format(i=i, guard=_GUARD if i in guarded else "")
            for i in range(count)
        )
        # A row the C loaders fail on (a value Python cannot hold) is loaded again by
        # `rescue`, value by value; on the fast path the try costs nothing.
        + "    try:\n"
        + "        if suspect:\n"
        + "            raise LookupError\n"
        + f"        {values}= load([{values}])\n"
        + "    except Exception:\n"
        + f"        {values}= rescue([{values}])\n"
        + f"    row = {{{row}}}\n"
        + f"    key = {{{key}}}\n"
        "    if unchanged is None:\n"
        "        return row, key, o, None\n"
        "    names = [columns[i] for i in unchanged]\n"
        "    for name in names:\n"
        "        row[name] = UNCHANGED\n"
        "        if name in key:\n"
        "            key[name] = UNCHANGED\n"
        "    return row, key, o, names\n"
    )

    def wrong_count(found: int) -> None:
        raise DecodeError(f"{table}: tuple has {found} columns, relation {count}")

    namespace: dict[str, Any] = {
        "unpack_length": _KIND_AND_LENGTH.unpack_from, "unpack_count": _INT16.unpack_from,
        "bad_kind": _bad_kind, "wrong_count": wrong_count, "count_bytes": _INT16.pack(count),
        "columns": columns, "UNCHANGED": UNCHANGED, "load": load,
        "rescue": rescue or _reraise,
    }
    exec(compile(source, f"<pgoutput row decoder for {table}>", "exec"), namespace)
    decoder: RowDecoder = namespace["decode"]
    return decoder
