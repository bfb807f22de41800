"""The values a feed produces: `Operation` flags, immutable `Change` records, and the
table-level events beside them (`Truncate`).

A `Change` holds Python values (int, Decimal, datetime, UUID, dict, list, bytes), never the
database's text. Its ``position`` is opaque to everyone but the backend that made it: it is
JSON-serialisable and, within one feed, ordered, so sinks can drop duplicates after a replay.
A `Truncate` says a table was emptied; it has a position in the same sequence and is
acknowledged like a change.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from changefeed.errors import ConfigurationError

Position = str | int | dict[str, Any] | None
"""A backend's resume position: JSON-serialisable, ordered within one feed. PostgreSQL's is a
`PgPosition` (a str: commit LSN and index), MongoDB's a resume token (a dict), a Redis stream's
or a Kafka record's a str, `changefeed.testing.MemoryFeed`'s an int; None: none yet."""


class Operation(enum.IntFlag):
    """The kinds of change a feed watches; combine them with ``|``.

    The values are BigchainDB's, so ``ChangeFeed.INSERT | ChangeFeed.UPDATE`` code keeps working.
    ``TRUNCATE`` (a table emptied: a `Truncate` item) is part of `ALL`; only PostgreSQL has it.
    """

    INSERT = 1
    DELETE = 2
    UPDATE = 4
    TRUNCATE = 8

    @classmethod
    def parse(cls, text: str) -> Operation:
        """Parse ``"insert,update"`` (or ``"all"``) into a flag.

        Raises `ConfigurationError` naming the valid words on anything else.
        """
        valid = [(op.name or "").lower() for op in cls]
        words = [word.strip().lower() for word in text.split(",") if word.strip()]
        if not words:
            raise ConfigurationError(f"no operation given: use one or more of {', '.join(valid)}")
        result = cls(0)
        for word in words:
            if word == "all":
                result |= ALL
            elif word in valid:
                result |= cls[word.upper()]
            else:
                raise ConfigurationError(
                    f"unknown operation {word!r}: use one or more of {', '.join(valid)}, or all"
                )
        return result

    @property
    def names(self) -> list[str]:
        """The lower-case names of the single operations in this flag, e.g. ``['insert']``."""
        return [(op.name or "").lower() for op in Operation if op in self]


ALL = Operation.INSERT | Operation.DELETE | Operation.UPDATE | Operation.TRUNCATE
ROW_OPERATIONS = Operation.INSERT | Operation.DELETE | Operation.UPDATE
"""The operations of single rows (what a `Change` can be)."""


class _Unchanged:
    """The type of `UNCHANGED`: one instance, which survives pickling."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"

    def __bool__(self) -> bool:
        return False


UNCHANGED = _Unchanged()
"""Stands for a column the source did not send because it did not change.

PostgreSQL leaves unchanged TOASTed values out of an update; the row then holds `UNCHANGED`
for that column, never a made-up None. JSON output leaves such columns out and lists them
under ``"unchanged"``.
"""


@typing.final
@dataclass(frozen=True, slots=True, init=False)
class Change:
    """One insert, update or delete, as committed: an immutable record.

    ``old`` is the whole row before an update or delete where the source provides it, else only
    the key columns (PostgreSQL's REPLICA IDENTITY DEFAULT); None for inserts. ``new`` is None for
    deletes. ``snapshot`` is True for rows read by the snapshot prefeed. ``meta`` holds
    backend-specific facts (e.g. that a MongoDB ``new`` was looked up after the change).
    ``schema_version`` identifies the table's shape (column names and types) when the change
    was made, where the backend knows it (PostgreSQL): it changes with the shape.
    Copy one with changes through ``dataclasses.replace()``.
    """

    operation: Operation
    table: str
    new: dict[str, Any] | None
    old: dict[str, Any] | None = None
    key: dict[str, Any] | None = None
    position: Position = None
    committed_at: datetime | None = None
    transaction: Any = None
    snapshot: bool = False
    meta: dict[str, Any] | None = None
    schema_version: str | None = None

    def __init__(
        self: Any,  # a _ChangeFields while it is filled in (below): plain attribute stores
        operation: Operation,
        table: str,
        new: dict[str, Any] | None,
        old: dict[str, Any] | None = None,
        key: dict[str, Any] | None = None,
        position: Position = None,
        committed_at: datetime | None = None,
        transaction: Any = None,
        snapshot: bool = False,
        meta: dict[str, Any] | None = None,
        schema_version: str | None = None,
    ) -> None:
        # Feeds build hundreds of thousands of these a second, and a frozen dataclass pays for
        # each field through object.__setattr__. So the new object briefly becomes its mutable
        # twin `_ChangeFields` (same slots, same memory layout), gets plain attribute stores,
        # and turns back into a Change: a third of the cost, and still immutable afterwards.
        _object_setattr(self, "__class__", _ChangeFields)
        self.operation = operation
        self.table = table
        self.new = new
        self.old = old
        self.key = key
        self.position = position
        self.committed_at = committed_at
        self.transaction = transaction
        self.snapshot = snapshot
        self.meta = meta
        self.schema_version = schema_version
        self.__class__ = Change

    @property
    def row(self) -> dict[str, Any] | None:
        """The row as it is now: ``new``, or ``old`` for a delete."""
        return self.new if self.new is not None else self.old

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output; `UNCHANGED` columns are listed, not given values.

        The ``change`` format; `changefeed.formats.change_dict` reads it back."""
        result: dict[str, Any] = {
            "operation": self.operation.name.lower() if self.operation.name else None,
            "table": self.table,
            "key": self.key,
            "new": _without_unchanged(self.new),
            "old": _without_unchanged(self.old),
            "position": self.position,
            "committed_at": self.committed_at,
            "transaction": self.transaction,
            "snapshot": self.snapshot,
        }
        unchanged = unchanged_columns(self.new)
        if unchanged:
            result["unchanged"] = unchanged
        if self.meta:
            result["meta"] = self.meta
        if self.schema_version is not None:
            result["schema_version"] = self.schema_version
        return result


@dataclass(frozen=True, slots=True)
class SnapshotState:
    """Where a table's snapshot starts or is done, among the changes of a feed asked for them.

    ``state`` is ``"started"`` or ``"done"``; ``position`` orders it with the changes (it is
    acknowledged like one). `changefeed run --format change` writes it as
    ``{"type": "snapshot", "table": ..., "state": ..., "position": ...}``.
    """

    table: str
    state: str
    position: Position

    def to_dict(self) -> dict[str, Any]:
        return {"type": "snapshot", "table": self.table, "state": self.state,
                "position": self.position}


@dataclass(frozen=True, slots=True)
class Truncate:
    """A table emptied by ``TRUNCATE``, as committed: every row of ``table`` is gone.

    One per table: a statement truncating several tables (listed, or reached by ``CASCADE``)
    gives one each, in the statement's order, with consecutive positions. ``cascade`` and
    ``restart_identity`` are the statement's options. A consumer keeping a copy of the table
    empties it; ``position``, ``committed_at`` and ``transaction`` are as on a `Change` (it is
    acknowledged like one), ``meta`` as on a `Change` read back from a log.
    `changefeed run --format change` writes it as ``{"operation": "truncate", "table": ...,
    "position": ..., ...}`` (see `to_dict`).
    """

    table: str
    position: Position = None
    committed_at: datetime | None = None
    transaction: Any = None
    cascade: bool = False
    restart_identity: bool = False
    meta: dict[str, Any] | None = None

    @property
    def operation(self) -> Operation:
        """`Operation.TRUNCATE`: what an operation mask filters it by."""
        return Operation.TRUNCATE

    @property
    def snapshot(self) -> bool:
        """False: a truncate is never part of a snapshot (as on a `Change` streamed)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, shaped like `Change.to_dict` (``operation``, ``table``,
        ``position``, ``committed_at``, ``transaction``) with the statement's options;
        `changefeed.formats.change_dict` reads it back."""
        result: dict[str, Any] = {
            "operation": "truncate",
            "table": self.table,
            "position": self.position,
            "committed_at": self.committed_at,
            "transaction": self.transaction,
            "cascade": self.cascade,
            "restart_identity": self.restart_identity,
        }
        if self.meta:
            result["meta"] = self.meta
        return result


class _ChangeFields:
    """What a `Change` is while its __init__ fills it in (see there); never seen outside."""

    __slots__ = Change.__slots__


_object_setattr = object.__setattr__


def unchanged_columns(row: dict[str, Any] | None) -> list[str]:
    """The names of the columns of ``row`` that hold `UNCHANGED`."""
    if not row:
        return []
    return [name for name, value in row.items() if value is UNCHANGED]


def _without_unchanged(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None or UNCHANGED not in row.values():
        return row
    return {name: value for name, value in row.items() if value is not UNCHANGED}
