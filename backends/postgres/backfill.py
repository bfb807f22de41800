"""Back-fills: the snapshot in primary-key chunks beside the stream (see `chunks` for how).

`Backfills` is the one object a feed holds for them: which tables to back-fill (planned at the
first connection, or requested through the slot by ``changefeed backfill``), the open chunk
window, the chunks handed out until their rows are acknowledged, and the progress recorded on
the publication. Its chunk reads and watermarks go through the feed's plain connection.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from changefeed.backends.postgres import catalog, names, slots
from changefeed.backends.postgres.chunks import (
    BACKFILL_PREFIX,
    RECENT_SECONDS,
    WATERMARK_PREFIX,
    ChunkWindow,
    FinishedChunk,
    TableBackfill,
    requested_tables,
    window_changes,
)
from changefeed.backends.postgres.connection import MESSAGES_VERSION
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.loading import TypeLoaders, psycopg_loaders, query_rows
from changefeed.backends.postgres.pgoutput import PgOutputDecoder
from changefeed.backends.postgres.snapshot import DONE, schema_version_of
from changefeed.backends.postgres.tables import Table, WatchedTables, resolve_tables
from changefeed.backends.postgres.values import SESSION_SETTINGS
from changefeed.change import Change, SnapshotState
from changefeed.errors import BackendError, ConfigurationError, first_line
from changefeed.message import Message

log = logging.getLogger("changefeed.postgres")


def in_chunks(server_version: int, tables: Iterable[Table]) -> bool:
    """Whether snapshots go in key chunks through the stream: when the server sends logical
    messages (14+) and every table has a primary key; else the whole snapshot is read in the
    slot's exported snapshot at creation (`snapshot`)."""
    return server_version >= MESSAGES_VERSION and all(table.key for table in tables)


class Backfills:
    """A feed's back-fills beside the stream.

    ``connection`` gives the feed's plain connection (autocommit); ``tables`` are the feed's;
    ``save(states)`` records progress (a dict of OID -> state, "done" for finished tables).
    """

    def __init__(
        self, slot: str, tables: WatchedTables, connection: Callable[[], psycopg.Connection],
        *, chunk_size: int, markers: bool, save: Callable[[dict[str, Any]], None],
    ) -> None:
        self.slot = slot
        self.tables = tables
        self.connection = connection
        self.chunk_size = chunk_size
        self.markers = markers
        self.save = save
        self.read_rows = ChunkReader()
        self.queue: deque[TableBackfill] = deque()
        self.window: ChunkWindow | None = None
        self.finished: deque[FinishedChunk] = deque()
        """Chunks handed out whose rows are not all acknowledged yet."""
        self.states: dict[str, Any] = {}
        self.last_report = 0.0
        self.recent: deque[tuple[float, str, tuple[Any, ...]]] = deque(maxlen=100_000)
        """(when, table, key) of the stream's changes of tables waiting to be back-filled."""

    # -- which tables --------------------------------------------------------------------------

    def plan(self, conn: psycopg.Connection, meta: dict[str, Any]) -> None:
        """Back-fill each table whose snapshot was not delivered on this slot yet, continuing
        after the last recorded chunk of one cut short."""
        planned = list(backfill_states(meta, self.tables.by_oid.values()))
        if planned:
            self.states.update(meta.get("backfill") or {})
        for table, state in planned:
            name = self.tables.stream_names.get(table.oid, table.qualified)
            self.start(table_backfill(conn, table, name, state))

    def start(self, backfill: TableBackfill) -> None:
        """Queue ``backfill`` (replacing one of the same table that has not begun a chunk)."""
        self.queue = deque(b for b in self.queue if b.oid != backfill.oid)
        self.queue.append(backfill)
        self.states[str(backfill.oid)] = backfill.state()

    def _requested(self, content: bytes) -> None:
        for oid in requested_tables(content, self.slot):
            table = self.tables.by_oid.get(oid)
            if table is None or oid in self.tables.dropped:
                continue
            if not table.key:
                log.warning("cannot back-fill %s: it has no primary key", table.qualified)
                continue
            log.info("back-fill of %s requested: reading it in chunks of %s rows",
                     table.qualified, f"{self.chunk_size:,}")
            name = self.tables.stream_names.get(oid, table.qualified)
            self.start(table_backfill(self.connection(), table, name))

    # -- beside the stream ---------------------------------------------------------------------

    @property
    def observer(self) -> Callable[[Change], None] | None:
        """What the stream gives each change while tables are back-filled (`observe`), or
        None when none is."""
        return self.observe if self.queue else None

    def observe(self, change: Change) -> None:
        """A change from the stream: inside the open window its key's chunk row is stale (and
        the old key's, when an update changed the key); keys are kept a moment for the next
        chunk (see `chunks`)."""
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
        identifier = self.tables.by_oid[backfill.oid].identifier
        if backfill.estimate == 0:
            backfill.estimate = _estimate(conn, backfill.oid, identifier)
        opened = time.monotonic()
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        last_key = backfill.after
        query = backfill.chunk_query(identifier, self.chunk_size)
        for row in self.read_rows(conn, query):
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

    def on_message(
        self, message: Message, decoder: PgOutputDecoder
    ) -> list[Change | SnapshotState]:
        """Handle one of changefeed's own messages: a watermark closing a chunk (its rows come
        out, positioned in the watermark's transaction), or a back-fill request."""
        if message.prefix == BACKFILL_PREFIX:
            self._requested(message.content)
            return []
        window = self._watermark(message.content)
        if window is None:
            return []
        oid = window.backfill.oid
        relation = decoder.relations.get(oid)
        version = (relation.schema_version if relation is not None
                   else schema_version_of(self.connection(), oid))
        changes, last = window_changes(
            window, self.tables.stream_names.get(oid, window.backfill.table), version,
            decoder.next_position, markers=self.markers,
        )
        self.finished[-1].last_position = last
        return changes

    def _watermark(self, content: bytes) -> ChunkWindow | None:
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
                self.states[str(backfill.oid)] = DONE
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


def backfill_states(
    meta: dict[str, Any], tables: Iterable[Table]
) -> Iterator[tuple[Table, Any]]:
    """The tables whose snapshot was not delivered on this slot yet, with the recorded state
    of a back-fill cut short (None: from the start)."""
    states = meta.get("backfill") or {}
    legacy_done = meta.get("snapshot") == DONE  # recorded by versions without back-fills
    for table in tables:
        state = states.get(str(table.oid))
        if state == DONE or (state is None and legacy_done):
            continue
        yield table, state


def table_backfill(
    conn: psycopg.Connection, table: Table, name: str, state: Any = None
) -> TableBackfill:
    """The back-fill of ``table`` (streamed as ``name``), continuing after a recorded state."""
    state = state if isinstance(state, dict) else {}
    return TableBackfill(
        table.oid, name, list(table.key), key_types(conn, table.oid, table.key),
        after=state.get("after"), done=state.get("done", 0), chunks=state.get("chunks", 0),
        # A recorded chunk was acknowledged, and the "started" marker before its rows with it.
        announced=state.get("chunks", 0) > 0,
    )


class ChunkReader:
    """Reads a back-fill chunk's rows as dicts (one short statement, in its own transaction),
    loaded by the stream's own loaders: the same values as streamed rows."""

    def __init__(self) -> None:
        self._loaders: TypeLoaders | None = None

    def __call__(self, conn: psycopg.Connection, query: sql.Composed) -> list[dict[str, Any]]:
        if self._loaders is None or self._loaders.catalog is not conn:
            conn.execute(SESSION_SETTINGS)  # the settings the loaders expect of values' text
            self._loaders = psycopg_loaders(conn, catalog=conn)
        return query_rows(conn, query, self._loaders)


def save_progress(
    conn: Callable[[], psycopg.Connection], publication: str, meta: dict[str, Any],
    states: dict[str, Any],
) -> None:
    """Record back-fill progress in the publication's record (a failure is only a warning:
    the back-fill then continues from an earlier chunk after a restart)."""
    meta["backfill"] = dict(states)
    try:
        catalog.write_meta(conn(), publication, meta)
    except (psycopg.Error, BackendError) as exc:
        log.warning("could not record back-fill progress on %s: %s", publication,
                    first_line(exc))


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


def request_backfill(conn: psycopg.Connection, slot: str, tables: Sequence[Table]) -> list[str]:
    """Ask the feed of ``slot`` to back-fill ``tables``: the request goes through the slot,
    so a running feed starts at once and a stopped one when it next reads. Returns the
    tables' names."""
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


def request_backfills(url: str, slot: str, tables: Sequence[str]) -> list[str]:
    """`request_backfill` for ``changefeed backfill``: a URL, and table names or patterns as
    given on the command line; returns the tables' names."""
    parsed = [names.parse_table_name(t) for name in tables for t in names.split_tables(name)]
    with slots.connect(url) as conn:
        return request_backfill(conn, names.check_slot_name(slot), resolve_tables(conn, parsed))
