"""Pure decoding of RethinkDB changefeed documents, and the bookkeeping of re-reads.

Nothing here does I/O: `decode_change` turns one document into a `Change` or a `State`, and
`StreamHistory` decides how the next stream opens from what the earlier ones did. Both are
tested on recorded document shapes, without a server.

Mapping of the documents a ``changes(include_types=True, include_states=True)`` cursor yields:

* ``{"type": "add", "new_val": row}``: INSERT, ``new`` = row;
* ``{"type": "change", "old_val": old, "new_val": row}``: UPDATE, ``old`` = the whole old row;
* ``{"type": "remove", "old_val": old}``: DELETE, ``old`` = the whole row, ``new`` None;
* ``{"type": "initial", "new_val": row}``: INSERT with ``snapshot=True`` (a read of the table);
* ``{"type": "uninitial", ...}``: skipped (only ordered ``limit`` feeds send it);
* ``{"state": "initializing" | "ready"}``: no change but a `State`; ``ready`` ends the read;
* ``{"error": "..."}``: raises `TransientBackendError` (the server dropped changes).

``table`` is ``"db.table"`` and ``key`` is ``{primary_key: value}``. Old values are complete:
RethinkDB sends the whole old document with every update and delete. Rows are the driver's
values (``datetime`` with the driver's fixed-offset tzinfo for times, ``bytes`` for binary).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from changefeed.change import Change, Operation, Position
from changefeed.errors import DecodeError, TransientBackendError

_INSERT = Operation.INSERT
_UPDATE = Operation.UPDATE
_DELETE = Operation.DELETE


@dataclass(frozen=True, slots=True)
class State:
    """A ``{"state": ...}`` document of the feed: ``"initializing"`` or ``"ready"``.

    ``ready`` means the initial read (``include_initial``) is complete: what follows are changes.
    """

    state: str


READY = State("ready")


def decode_change(
    doc: Mapping[str, Any],
    table: str,
    primary_key: str = "id",
    *,
    position: Position = None,
    snapshot_meta: dict[str, Any] | None = None,
) -> Change | State | None:
    """Turn one document of a RethinkDB changefeed into a `Change`, a `State`, or None.

    Args:
        doc: a document from a ``changes(include_types=True, include_states=True)`` cursor
            (documents without ``type`` are understood too, from their ``old_val``/``new_val``).
        table: the qualified ``db.table`` name the changes get.
        primary_key: the table's primary key, for ``Change.key``.
        position: the position the change gets (see `make_position`).
        snapshot_meta: the ``meta`` of ``initial`` rows (e.g. ``{"resync": 1}``).

    Returns None for documents that are no change (``uninitial``). Raises
    `TransientBackendError` for an ``{"error": ...}`` document: RethinkDB puts one in the
    stream when it had to drop changes (its queue overflowed), so the feed must re-sync.
    Raises `DecodeError` for a document type it does not know: skipping it could lose a change.
    """
    kind = doc.get("type")
    if kind == "add":
        new = doc["new_val"]
        return Change(_INSERT, table, new, None, {primary_key: new.get(primary_key)}, position)
    if kind == "change":
        new = doc["new_val"]
        return Change(
            _UPDATE, table, new, doc.get("old_val"), {primary_key: new.get(primary_key)}, position
        )
    if kind == "remove":
        old = doc["old_val"]
        return Change(_DELETE, table, None, old, {primary_key: old.get(primary_key)}, position)
    if kind == "initial":
        new = doc["new_val"]
        return Change(
            _INSERT, table, new, None, {primary_key: new.get(primary_key)}, position,
            None, None, True, snapshot_meta,
        )
    if kind == "uninitial":
        return None
    if kind == "state" or (kind is None and "state" in doc):
        return State(str(doc["state"]))
    if "error" in doc:
        raise TransientBackendError(f"RethinkDB reported on the changefeed of {table}: "
                                    f"{doc['error']}")
    if kind is None:  # a feed opened without include_types
        new, old = doc.get("new_val"), doc.get("old_val")
        if new is not None and old is not None:
            kind = "change"
        elif new is not None:
            kind = "add"
        elif old is not None:
            kind = "remove"
        else:
            return None
        return decode_change({**doc, "type": kind}, table, primary_key, position=position)
    raise DecodeError(f"unknown RethinkDB changefeed document type {kind!r} on {table}")


def make_position(run: int, seq: int) -> str:
    """The position of the ``seq``-th document of the stream opened at ``run`` (Unix ms).

    Both parts are zero-padded, so positions compare as strings like the numbers they hold.
    """
    return f"{run:013d}:{seq:010d}"


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """How the next stream of a feed opens, as decided by `StreamHistory.next_stream`."""

    include_initial: bool
    """Open with ``include_initial=True``: the table's rows come first, as snapshot inserts."""
    resync: int | None = None
    """The number of this re-read of the table (from 1), or None when it is no re-read."""
    changes_lost: bool = False
    """The feed reconnects without re-reading: changes made while it was away are lost."""

    @property
    def snapshot_meta(self) -> dict[str, Any] | None:
        """The ``meta`` of the rows the stream's initial read emits."""
        return {"resync": self.resync} if self.resync is not None else None


class StreamHistory:
    """What the earlier streams of one feed did, and so how the next one must open.

    RethinkDB cannot resume a changefeed, so every stream after the first one (and the first
    one of a run that follows an earlier run) re-reads the table, unless re-syncing is off.
    A snapshot prefeed reads the table once, until a stream got through its whole read.

    Args:
        snapshot: the feed's prefeed is ``"snapshot"``.
        resync: re-read the table after a reconnect or restart.
        restarted: a checkpoint shows that an earlier run delivered changes.
    """

    def __init__(self, *, snapshot: bool, resync: bool, restarted: bool) -> None:
        self.snapshot_pending = snapshot
        self.resync = resync
        self.restarted = restarted
        self.streamed = False
        """A stream was opened before: the next one follows a reconnect."""
        self.resyncs = 0
        """Re-reads read to their end."""
        self.run = 0
        """The ``run`` part of the positions of the current stream (see `make_position`)."""

    def next_stream(self) -> StreamPlan:
        """How the next stream opens; nothing changes until `stream_opened` is called."""
        reconnecting = self.streamed or self.restarted
        resyncing = self.resync and reconnecting
        return StreamPlan(
            include_initial=self.snapshot_pending or resyncing,
            resync=self.resyncs + 1 if resyncing else None,
            changes_lost=reconnecting and not self.resync,
        )

    def stream_opened(self, now_ms: int) -> int:
        """Note that a stream was opened at ``now_ms`` (Unix ms); return its ``run``.

        Runs increase strictly within a feed even if the clock stands still or goes back, so
        positions of a later stream sort after those of an earlier one.
        """
        self.streamed = True
        self.run = max(now_ms, self.run + 1)
        return self.run

    def initial_read_done(self, plan: StreamPlan) -> None:
        """The stream opened by ``plan`` sent ``ready``: its read of the table is complete.

        An interrupted read counts for nothing: the next stream reads again, with the same
        re-read number.
        """
        self.snapshot_pending = False
        if plan.resync is not None:
            self.resyncs += 1
