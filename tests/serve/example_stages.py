"""Python stages that the tests name as ``MODULE:NAME`` (``--stage``, ``stages = [...]``): this
directory is put on PYTHONPATH for the processes that import them."""

from __future__ import annotations

import dataclasses

from changefeed.change import Change


def shout(change: Change) -> Change:
    """The change with its new row's ``title`` in capitals."""
    if change.new is None or "title" not in change.new:
        return change
    return dataclasses.replace(change, new={**change.new, "title": change.new["title"].upper()})


def even_ids_only(change: Change) -> Change | None:
    row = change.new if change.new is not None else change.old
    return change if row and row.get("id", 0) % 2 == 0 else None


def twice(change: Change) -> list[Change]:
    return [change, change]


def explode_on_13(change: Change) -> Change:
    """Fails on the row with id 13 (a stage with a bug that the same row always hits)."""
    row = change.new if change.new is not None else change.old
    if row and row.get("id") == 13:
        raise ValueError("unlucky row 13")
    return change


NOT_CALLABLE = 42


class Namespace:
    shout = staticmethod(shout)
