"""Snorky-shaped deltas: what a subscriber of a model needs to apply one change::

    {"type": "insert", "model": "Task", "data": {...}}
    {"type": "update", "model": "Task", "newData": {...}, "oldData": {...}}
    {"type": "delete", "model": "Task", "data": {...}}
    {"type": "truncate", "model": "Task"}

A truncate delta (from a `Truncate`) says every row of the model is gone: a subscriber empties
its copy. (Snorky's own server knows only the first three; `changefeed.pipelines.sinks.http`
says so and leaves truncates out of what it sends it.)

Columns holding `UNCHANGED` (an unchanged TOASTed value PostgreSQL did not send) are left out of
the row, and an update delta names them: ``"unchanged": ["big"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

import changefeed._speedups as _speedups
from changefeed.change import (
    UNCHANGED,
    Change,
    Operation,
    Truncate,
    _without_unchanged,
    unchanged_columns,
)
from changefeed.formats.codec import ORJSON_OPTIONS, dumps, dumps_default, dumps_line


def delta_of(
    change: Change | Truncate, model: str | Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The Snorky delta of ``change``; ``model`` defaults to the table name without schema.

    ``model`` may map tables to models: by qualified name (``public.tasks``), then bare name
    (``tasks``), then ``"*"``; a table it does not name gets its bare name.
    """
    if model is None or not isinstance(model, str):
        model = model_for(change.table, model)
    operation = change.operation
    if operation is Operation.INSERT:
        return {"type": "insert", "model": model, "data": change.new}  # type: ignore[union-attr]
    if operation is Operation.UPDATE:
        # Only updates can hold UNCHANGED (a TOASTed value PostgreSQL did not resend): such
        # columns are left out of the rows and named, so a client replacing its object with
        # newData knows to keep (or look up) them.
        new = change.new  # type: ignore[union-attr]
        delta: dict[str, Any] = {
            "type": "update",
            "model": model,
            "newData": new,
            "oldData": _without_unchanged(change.old),  # type: ignore[union-attr]
        }
        if new is not None and UNCHANGED in new.values():  # rare: checked in C first
            delta["newData"] = _without_unchanged(new)
            delta["unchanged"] = unchanged_columns(new)
        return delta
    if operation is Operation.DELETE:
        return {"type": "delete", "model": model, "data": change.old}  # type: ignore[union-attr]
    if operation is Operation.TRUNCATE:
        return {"type": "truncate", "model": model}
    raise ValueError(f"a change has exactly one operation, not {operation!r}")


class ToDelta:
    """`delta_of` with one ``model``, as a picklable callable named in errors and dead letters:
    the ``to_delta()`` stage of a pipeline, and the ``delta`` format of the CLI and the sinks."""

    __slots__ = ("model",)

    def __init__(self, model: str | Mapping[str, str] | None = None) -> None:
        self.model = model

    @property
    def name(self) -> str:
        return f"to_delta(model={self.model!r})"

    def __call__(self, change: Change | Truncate) -> dict[str, Any]:
        return delta_of(change, self.model)


def model_for(table: str, models: Mapping[str, str] | None) -> str:
    """The model name of ``table`` in ``models`` (see `delta_of`)."""
    bare = table.rpartition(".")[2]
    if not models:
        return bare
    return models.get(table) or models.get(bare) or models.get("*") or bare


def delta_line_encoder(
    model: str | Mapping[str, str] | None = None,
) -> Callable[[Change], bytes]:
    """A function giving the same bytes as ``dumps_line(delta_of(change, model))``, faster.

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
            return dumps_line(delta_of(change, model))
        start = starts.get(change.table)
        if start is None:
            start = starts[change.table] = _delta_starts(change.table, model)
        try:
            return (start[which] + orjson.dumps(row, default=dumps_default, option=ORJSON_OPTIONS)
                    + b"}\n")
        except orjson.JSONEncodeError:  # keys that are not strings, ...: the general path
            return dumps_line(delta_of(change, model))

    return encode


def _delta_starts(table: str, model: str | Mapping[str, str] | None) -> tuple[bytes, bytes]:
    """The bytes of ``table``'s insert and delete deltas up to their row, which comes last."""
    insert = dumps(delta_of(Change(_INSERT, table, new={}), model))
    delete = dumps(delta_of(Change(_DELETE, table, new=None, old={}), model))
    return insert[: -len(b"{}}")], delete[: -len(b"{}}")]  # without the empty row and "}"


_INSERT, _DELETE = Operation.INSERT, Operation.DELETE

__all__ = ["ToDelta", "delta_line_encoder", "delta_of", "model_for"]

# The compiled encoder where it is built (the function above stays the reference).
delta_line_encoder = _speedups.encoder_factory(delta_line_encoder, "DeltaEncoder")
