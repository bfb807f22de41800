"""Back-fill chunks: a table's rows read in primary-key chunks while the stream goes on (DBLog).

The approach of Netflix's DBLog (Andreakis & Papapanagiotou, 2020) and Debezium's incremental
snapshots. For each chunk, on a plain autocommit connection, between two reads of the stream:

1. the next chunk is selected: ``WHERE key > last key ORDER BY key LIMIT size`` (one short
   statement: no long transaction holds back ``xmin``),
2. a high watermark is written through the slot (``pg_logical_emit_message``, transactional).

The chunk's window opens where the stream was read up to when the chunk was selected, and
closes at the high watermark. A change of the table inside the window may be newer than what
the SELECT saw: it removes its key from the chunk. At the high watermark the chunk's remaining
rows are handed out as snapshot inserts, positioned inside the watermark's transaction, so they
are acknowledged like any change.

Why no low watermark: PostgreSQL writes a transaction's commit record a moment before it makes
the transaction visible, so a change committed just before a low watermark could be missing from
a chunk read right after it (and the chunk row would then take that row back to an older value).
Opening the window at the stream position instead covers every change the stream had not given
yet, and keys the stream gave in the last `RECENT_SECONDS` before the SELECT are removed from the
chunk too; removing a key is always safe, since the stream delivers its change.

Once a chunk's rows are acknowledged, its last key is recorded on the publication: after
a crash, a reconnect or a server restart the back-fill continues after the last finished chunk,
and the slot, which kept the stream, delivers everything that happened meanwhile.

A consumer that applies the output in order (inserts as upserts) ends with exactly the table's
rows: a snapshot row never overwrites a newer change, and no change is lost.

This module holds the pure parts (a table's progress, a chunk's window, the snapshot changes
of a closed window); `changefeed.backends.postgres.backfill` does the side-connection I/O.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from changefeed.backends.postgres.position import PgPosition
from changefeed.change import Change, Operation, SnapshotState

WATERMARK_PREFIX = "changefeed.watermark"
"""The prefix of the high watermarks the feed writes through its slot."""
RECENT_SECONDS = 1.0
"""Keys the stream gave this long before a chunk's SELECT are taken out of the chunk."""
BACKFILL_PREFIX = "changefeed.backfill"
"""`changefeed backfill` writes this message; the running feed of the named slot starts a
back-fill of the listed tables when it reads it."""


@dataclass
class TableBackfill:
    """Where one table's back-fill stands (recorded on the publication after each chunk)."""

    oid: int
    table: str
    key: list[str]
    key_types: list[str]
    after: list[str] | None = None
    """The last key done, as PostgreSQL text of each key column (None: from the start)."""
    done: int = 0
    chunks: int = 0
    estimate: int = 0
    started: float = field(default_factory=time.monotonic)
    announced: bool = False

    def state(self) -> dict[str, Any]:
        return {"after": self.after, "done": self.done, "chunks": self.chunks}

    def chunk_query(self, identifier: sql.Identifier, size: int) -> sql.Composed:
        """The next chunk's rows, each with its key as text (``__changefeed_key``) first."""
        keys = [sql.Identifier(column) for column in self.key]
        key_text = sql.SQL("ARRAY[{}]::text[]").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in keys)
        )
        query = sql.SQL("SELECT {} AS __changefeed_key, t.* FROM {} t").format(
            key_text, identifier
        )
        if self.after is not None:
            bound = sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(type_name))
                for value, type_name in zip(self.after, self.key_types, strict=True)
            )
            query += sql.SQL(" WHERE ({}) > ({})").format(sql.SQL(", ").join(keys), bound)
        order = sql.SQL(", ").join(keys)
        return query + sql.SQL(" ORDER BY {} LIMIT {}").format(order, sql.Literal(size))


@dataclass
class ChunkWindow:
    """One chunk between its watermarks: rows by key, minus the keys the stream changed."""

    backfill: TableBackfill
    watermark: str
    rows: dict[tuple[Any, ...], dict[str, Any]]
    last_key: list[str] | None
    complete: bool
    """The chunk was shorter than asked: the table is done after it."""


@dataclass
class FinishedChunk:
    """A chunk handed out; recorded once the slot is confirmed past ``end_lsn``."""

    backfill: TableBackfill
    last_key: list[str] | None
    count: int
    complete: bool
    end_lsn: int = 0
    last_position: PgPosition | None = None
    """The position of the chunk's last row handed out (None: no row)."""


def requested_tables(content: bytes, slot: str) -> list[int]:
    """The table OIDs a `BACKFILL_PREFIX` message asks ``slot``'s feed to back-fill
    (none when it is for another slot or not readable)."""
    try:
        request = json.loads(content)
    except ValueError:
        return []
    if not isinstance(request, dict) or request.get("slot") != slot:
        return []
    return list(request.get("tables") or [])


def window_changes(
    window: ChunkWindow, table: str, version: str | None,
    next_position: Callable[[], PgPosition], *, markers: bool,
) -> tuple[list[Change | SnapshotState], PgPosition | None]:
    """A chunk whose high watermark arrived, as snapshot changes of ``table`` positioned in the
    watermark's transaction (``next_position``), with the table's start and end markers where
    they fall; and the position of the chunk's last row (None: it had none)."""
    backfill = window.backfill
    out: list[Change | SnapshotState] = []
    if markers and not backfill.announced:
        out.append(SnapshotState(table, "started", next_position()))
    backfill.announced = True
    positions = [next_position() for _ in window.rows]
    if markers and window.complete:
        positions.append(next_position())
    for row, position in zip(window.rows.values(), positions, strict=False):
        key = {column: row[column] for column in backfill.key}
        out.append(Change(Operation.INSERT, table, row, None, key, position, None, None, True,
                          None, version))
    if markers and window.complete:
        out.append(SnapshotState(table, "done", positions[-1]))
    return out, positions[-1] if positions else None

