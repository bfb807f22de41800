"""Snorky-shaped deltas and the JSON encoding every sink shares.

A delta is what a subscriber of a model needs to apply one change::

    {"type": "insert", "model": "Task", "data": {...}}
    {"type": "update", "model": "Task", "newData": {...}, "oldData": {...}}
    {"type": "delete", "model": "Task", "data": {...}}

JSON encoding (orjson): datetimes in ISO 8601, UUIDs as strings, Decimals as strings (a JSON
number would lose digits in most consumers), bytes as base64, sets as lists, ranges as
``{"lower": .., "upper": .., "bounds": "[)"}`` (``{"empty": true}``), inet as PostgreSQL writes
it; a value whose class has a ``__json__`` method is encoded as what that returns (the
PostgreSQL value types of `changefeed.backends.postgres.values` use it: exact json numbers,
NaN/Infinity, intervals, texts Python cannot hold). The README's "Values" section has the table.

Columns holding `UNCHANGED` (an unchanged TOASTed value PostgreSQL did not send) are left out of
the row, and an update delta names them: ``"unchanged": ["big"]``.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

import orjson

from changefeed import _speedups
from changefeed.change import UNCHANGED, Change, Operation, _without_unchanged, unchanged_columns


def to_delta(change: Change, model: str | Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Snorky delta of ``change``; ``model`` defaults to the table name without schema.

    ``model`` may map tables to models: by qualified name (``public.tasks``), then bare name
    (``tasks``), then ``"*"``; a table it does not name gets its bare name.
    """
    if model is None or not isinstance(model, str):
        model = model_for(change.table, model)
    operation = change.operation
    if operation is Operation.INSERT:
        return {"type": "insert", "model": model, "data": change.new}
    if operation is Operation.UPDATE:
        # Only updates can hold UNCHANGED (a TOASTed value PostgreSQL did not resend): such
        # columns are left out of the rows and named, so a client replacing its object with
        # newData knows to keep (or look up) them.
        new = change.new
        delta = {
            "type": "update",
            "model": model,
            "newData": new,
            "oldData": _without_unchanged(change.old),
        }
        if new is not None and UNCHANGED in new.values():  # rare: checked in C first
            delta["newData"] = _without_unchanged(new)
            delta["unchanged"] = unchanged_columns(new)
        return delta
    if operation is Operation.DELETE:
        return {"type": "delete", "model": model, "data": change.old}
    raise ValueError(f"a change has exactly one operation, not {operation!r}")


def model_for(table: str, models: Mapping[str, str] | None) -> str:
    """The model name of ``table`` in ``models`` (see `to_delta`)."""
    bare = table.rpartition(".")[2]
    if not models:
        return bare
    return models.get(table) or models.get(bare) or models.get("*") or bare


def _default(value: Any) -> Any:
    cls = value.__class__
    if cls is Decimal:  # the common case first
        return str(value)
    encode = getattr(cls, "__json__", None)
    if encode is not None:
        return encode(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if value is UNCHANGED:
        return None  # only reached inside nested values; rows drop such columns first
    # psycopg's ranges, looked up only where psycopg is loaded: without it there are none, and
    # importing a driver here would slow every command's start.
    ranges = sys.modules.get("psycopg.types.range")
    if ranges is not None and isinstance(value, ranges.Range):
        if value.isempty:
            return {"empty": True}
        return {"lower": value.lower, "upper": value.upper, "bounds": value.bounds}
    multiranges = sys.modules.get("psycopg.types.multirange")
    if multiranges is not None and isinstance(value, multiranges.Multirange):
        return list(value)
    if isinstance(value, (IPv4Interface, IPv6Interface)):
        # As PostgreSQL writes inet: a host address without its full-length prefix.
        if value.network.prefixlen == value.max_prefixlen:
            return str(value.ip)
        return str(value)
    if hasattr(value, "isoformat"):  # time, timedelta-free date types orjson does not know
        return value.isoformat()
    # psycopg ranges, ipaddress objects and other values with a faithful text form
    return str(value)


_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS
_LINE = _OPTIONS | orjson.OPT_APPEND_NEWLINE
# Keys that are not strings (an int key in a stage's output) need OPT_NON_STR_KEYS, which
# makes every dict a third slower to encode: it is used only for values that need it.
_NON_STR_KEYS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON bytes, with changefeed's encoding of database values."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return orjson.dumps(value, default=_default, option=_OPTIONS | _NON_STR_KEYS)


def dumps_line(value: Any) -> bytes:
    """`dumps` followed by a newline: one JSON line."""
    try:
        return orjson.dumps(value, default=_default, option=_LINE)
    except orjson.JSONEncodeError:
        return orjson.dumps(value, default=_default, option=_LINE | _NON_STR_KEYS)


def delta_line_encoder(
    model: str | Mapping[str, str] | None = None,
) -> Callable[[Change], bytes]:
    """A function giving the same bytes as ``dumps_line(to_delta(change, model))``, faster.

    Inserts and deletes, the bulk of most streams, are written as the encoded start of their
    delta, made once per table, followed by the encoded row: no delta dict per change, and the
    constant keys encoded once. ``changefeed run`` writes its deltas with this.
    """
    starts: dict[str, tuple[bytes, bytes]] = {}

    def encode(change: Change) -> bytes:
        operation = change.operation
        if operation is _INSERT:
            row, which = change.new, 0
        elif operation is _DELETE:
            row, which = change.old, 1
        else:
            return dumps_line(to_delta(change, model))
        start = starts.get(change.table)
        if start is None:
            start = starts[change.table] = _delta_starts(change.table, model)
        try:
            return start[which] + orjson.dumps(row, default=_default, option=_OPTIONS) + b"}\n"
        except orjson.JSONEncodeError:  # keys that are not strings: the general path
            return dumps_line(to_delta(change, model))

    return encode


def _delta_starts(table: str, model: str | Mapping[str, str] | None) -> tuple[bytes, bytes]:
    """The bytes of ``table``'s insert and delete deltas up to their row, which comes last."""
    insert = dumps(to_delta(Change(_INSERT, table, new={}), model))
    delete = dumps(to_delta(Change(_DELETE, table, new=None, old={}), model))
    return insert[: -len(b"{}}")], delete[: -len(b"{}}")]  # without the empty row and "}"


_INSERT, _DELETE = Operation.INSERT, Operation.DELETE


# The compiled encoder where it is built (the function above stays the reference).
delta_line_encoder = _speedups.encoder_factory(delta_line_encoder, "DeltaEncoder")
