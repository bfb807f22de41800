"""Back-fills: a table's rows read in primary-key chunks while the stream goes on (DBLog).

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

`ChunkWindow` and `TableBackfill` are pure; `Backfiller` does the side-connection I/O.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.position import PgPosition

log = logging.getLogger("changefeed.postgres")

WATERMARK_PREFIX = "changefeed.watermark"
RECENT_SECONDS = 1.0
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


class Backfiller:
    """The back-fills of one feed: which tables, the open chunk window, progress records.

    ``connection`` gives the feed's plain connection (autocommit); ``read_rows(connection,
    query, size)`` loads rows as the stream would; ``save(state)`` records progress (a dict
    of OID -> state, "done" for finished tables).
    """

    def __init__(
        self,
        slot: str,
        chunk_size: int,
        connection: Callable[[], psycopg.Connection],
        read_rows: Callable[[psycopg.Connection, sql.Composed, int], Iterator[dict[str, Any]]],
        identifiers: Callable[[int], sql.Identifier],
        save: Callable[[dict[str, Any]], None],
    ) -> None:
        self.slot = slot
        self.chunk_size = chunk_size
        self.connection = connection
        self.read_rows = read_rows
        self.identifiers = identifiers
        self.save = save
        self.queue: deque[TableBackfill] = deque()
        self.window: ChunkWindow | None = None
        self.finished: deque[FinishedChunk] = deque()
        self.states: dict[str, Any] = {}
        self.last_report = 0.0
        self.recent: deque[tuple[float, str, tuple[Any, ...]]] = deque(maxlen=100_000)
        """(when, table, key) of the stream's changes of tables waiting to be back-filled."""

    def start(self, backfill: TableBackfill) -> None:
        """Queue ``backfill`` (replacing one of the same table that has not begun a chunk)."""
        self.queue = deque(b for b in self.queue if b.oid != backfill.oid)
        self.queue.append(backfill)
        self.states[str(backfill.oid)] = backfill.state()

    def observe(self, change: Any) -> None:
        """A change from the stream: inside the open window its key's chunk row is stale (and
        the old key's, when an update changed the key); keys are kept a moment for the next
        chunk (see the module docstring)."""
        table = change.table
        for backfill in self.queue:
            if backfill.table == table:
                break
        else:
            return
        columns = backfill.key
        keys = [tuple(row.get(c) for c in columns) for row in (change.key, change.old) if row]
        window = self.window
        if window is not None and window.backfill is backfill:
            for key in keys:
                window.rows.pop(key, None)
        now = time.monotonic()
        for key in keys:
            self.recent.append((now, table, key))

    @property
    def due(self) -> bool:
        """Whether a chunk should start now (none open, a table waiting)."""
        return self.window is None and bool(self.queue)

    def open_chunk(self) -> None:
        """Read the next chunk and write its high watermark; the window is open from here."""
        backfill = self.queue[0]
        conn = self.connection()
        watermark = uuid.uuid4().hex
        identifier = self.identifiers(backfill.oid)
        if backfill.estimate == 0:
            backfill.estimate = _estimate(conn, backfill.oid, identifier)
        opened = time.monotonic()
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        last_key = backfill.after
        query = backfill.chunk_query(identifier, self.chunk_size)
        for row in self.read_rows(conn, query, self.chunk_size):
            last_key = row.pop("__changefeed_key")
            rows[tuple(row.get(column) for column in backfill.key)] = row
        complete = len(rows) < self.chunk_size
        recent = self.recent
        while recent and recent[0][0] < opened - RECENT_SECONDS:
            recent.popleft()
        for _, table, key in recent:
            if table == backfill.table:
                rows.pop(key, None)
        self._emit(conn, watermark, "high")
        self.window = ChunkWindow(backfill, watermark, rows, last_key, complete=complete)

    def _emit(self, conn: psycopg.Connection, watermark: str, mark: str) -> None:
        content = json.dumps({"slot": self.slot, "id": watermark, "mark": mark})
        # Committed with synchronous_commit on: the walsender then sends it at once, not
        # when the WAL writer gets to it (up to wal_writer_delay later, for every chunk).
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit TO on")
            conn.execute(
                "SELECT pg_logical_emit_message(true, %s, %s)", [WATERMARK_PREFIX, content]
            )

    def watermark(self, content: bytes) -> ChunkWindow | None:
        """A watermark came through the stream: the window whose rows are due now (at its
        high watermark), else None. Watermarks of other feeds or of lost windows are ignored."""
        try:
            mark = json.loads(content)
        except ValueError:
            return None
        window = self.window
        if (not isinstance(mark, dict) or mark.get("slot") != self.slot or window is None
                or mark.get("id") != window.watermark):
            return None
        self.window = None
        backfill = window.backfill
        if window.complete:
            self.queue.popleft()
        else:
            backfill.after = window.last_key
        self.finished.append(
            FinishedChunk(backfill, window.last_key, len(window.rows), window.complete)
        )
        return window

    def committed(self, end_lsn: int) -> None:
        """The transaction of the last finished chunks ended at ``end_lsn``."""
        for chunk in self.finished:
            if chunk.end_lsn == 0:
                chunk.end_lsn = end_lsn

    def handed_out(self, last_position: PgPosition | None) -> None:
        """The rows of the chunk finished last were handed out, up to ``last_position``."""
        self.finished[-1].last_position = last_position

    def confirmed(self, ledger: AckLedger) -> None:
        """Record the chunks whose rows are all acknowledged (a chunk without rows: once the
        slot may confirm its watermark's transaction)."""
        changed = False
        while self.finished:
            chunk = self.finished[0]
            if chunk.last_position is not None:
                if not ledger.delivered(chunk.last_position):
                    break
            elif not 0 < chunk.end_lsn <= ledger.flush_lsn:
                break
            self.finished.popleft()
            backfill = chunk.backfill
            backfill.done += chunk.count
            backfill.chunks += 1
            if chunk.complete:
                self.states[str(backfill.oid)] = "done"
                log.info("snapshot of %s: done, %s rows in %s chunks", backfill.table,
                         f"{backfill.done:,}", backfill.chunks)
            else:
                self.states[str(backfill.oid)] = {
                    "after": chunk.last_key, "done": backfill.done, "chunks": backfill.chunks,
                }
                self._report(backfill)
            changed = True
        if changed:
            self.save(self.states)

    def _report(self, backfill: TableBackfill) -> None:
        now = time.monotonic()
        if now - self.last_report < 2.0:
            return
        self.last_report = now
        elapsed = max(now - backfill.started, 1e-6)
        rate = backfill.done / elapsed
        total = max(backfill.estimate, backfill.done)
        eta = (total - backfill.done) / rate if rate > 0 else 0.0
        log.info("snapshot of %s: %s / ~%s rows, %s chunks, %.0f rows/s, ETA %.0f s",
                 backfill.table, f"{backfill.done:,}", f"{total:,}", backfill.chunks, rate, eta)

    def reset(self) -> None:
        """The stream restarts (reconnect): an open window and unconfirmed chunks are lost;
        their tables continue from the last recorded chunk."""
        self.window = None
        lost = list(self.finished)
        self.finished.clear()
        for chunk in reversed(lost):
            backfill = chunk.backfill
            recorded = self.states.get(str(backfill.oid))
            backfill.after = recorded.get("after") if isinstance(recorded, dict) else None
            if all(queued is not backfill for queued in self.queue):
                self.queue.appendleft(backfill)


def request_backfill(conn: psycopg.Connection, slot: str, tables: list[Any]) -> list[str]:
    """Ask the feed of ``slot`` to back-fill ``tables`` (resolved `tables.Table`s): the request
    goes through the slot, so a running feed starts at once and a stopped one when it next
    reads. Returns the tables' names."""
    from changefeed.backends.postgres import catalog, slots
    from changefeed.errors import ConfigurationError

    if slots.get_slot(conn, slot) is None:
        raise ConfigurationError(f"no replication slot named {slot!r} in this database")
    publications = [p for p in catalog.changefeed_publications(conn) if p.meta.get("slot") == slot]
    published = frozenset().union(*(p.table_oids for p in publications)) if publications else None
    for table in tables:
        if published is not None and table.oid not in published:
            raise ConfigurationError(f"slot {slot} does not stream {table.qualified}")
        if not table.key:
            raise ConfigurationError(
                f"{table.qualified} has no primary key: it cannot be back-filled in chunks"
                " (a new feed with --prefeed snapshot reads it in one exported snapshot)"
            )
    content = json.dumps({"slot": slot, "tables": [table.oid for table in tables]})
    conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", [BACKFILL_PREFIX, content])
    return [table.qualified for table in tables]


def _estimate(conn: psycopg.Connection, oid: int, identifier: sql.Identifier) -> int:
    """Rows in the table (and its partitions) by the statistics; counted when never analysed."""
    row = conn.execute(
        "SELECT CASE WHEN min(c.reltuples) < 0 THEN NULL ELSE sum(c.reltuples) END::bigint"
        " FROM pg_class c WHERE c.relkind = 'r' AND (c.oid = %s"
        " OR c.oid IN (SELECT relid FROM pg_partition_tree(%s) WHERE isleaf))",
        [oid, oid],
    ).fetchone()
    if row is not None and row[0] is not None:
        return int(row[0])
    counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(identifier)).fetchone()
    return int(counted[0]) if counted else 0


def key_types(conn: psycopg.Connection, oid: int, key: list[str]) -> list[str]:
    """The SQL type names of the key columns (to cast recorded text keys back)."""
    rows = dict(conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s AND attname = ANY(%s)", [oid, key],
    ).fetchall())
    return [rows[column] for column in key]


def request_backfills(url: str, slot: str, tables: Sequence[str]) -> list[str]:
    """`request_backfill` for ``changefeed backfill``: a URL, and table names or patterns as
    given on the command line; returns the tables' names."""
    from changefeed.backends.postgres import names, slots
    from changefeed.backends.postgres import tables as tables_module

    parsed = [names.parse_table_name(t) for name in tables for t in names.split_tables(name)]
    with slots.connect(url) as conn:
        resolved = tables_module.resolve_tables(conn, parsed)
        return request_backfill(conn, names.check_slot_name(slot), resolved)
