"""Back-fills: the snapshot in key chunks beside the stream (see `chunks` for how).

`Backfills` is the one object a feed holds for them: which tables to back-fill (planned at the
first connection, requested through the slot by ``changefeed backfill``, or started by the feed
when a table appears: a partition attached with rows, a table renamed or newly matching a
pattern), the open chunk window, the chunks handed out until their rows are acknowledged, and
the progress recorded on the publication. Its chunk reads (`backfill_reads`, through COPY) and
watermarks go through the feed's plain connection; ``changefeed backfill`` asks for one through
the slot (`backfill_requests`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.backfill_reads import read_again, read_chunk
from changefeed.backends.postgres.chunks import (
    BACKFILL_PREFIX,
    RECENT_SECONDS,
    WATERMARK_PREFIX,
    ChunkWindow,
    FinishedChunk,
    TableBackfill,
    requested_tables,
    window_changes,
    window_lines,
)
from changefeed.backends.postgres.connection import MESSAGES_VERSION
from changefeed.backends.postgres.copy import CopyReader
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.pgoutput import PgOutputDecoder
from changefeed.backends.postgres.snapshot import DONE, schema_version_of
from changefeed.backends.postgres.tables import (
    Table,
    WatchedTables,
)
from changefeed.change import UNCHANGED, Change, Operation, Truncate
from changefeed.errors import BackendError, first_line
from changefeed.formats.json_values import loads_value
from changefeed.message import Message

log = logging.getLogger("changefeed.postgres")

DEFAULT_CHUNK_ROWS = 100_000
"""Rows per chunk at most unless told (``--chunk-size``): `CHUNK_BYTES` sizes most chunks (a
chunk costs several round trips and a watermark's trip through the walsender)."""
CHUNK_BYTES = 16 << 20
"""A chunk's rows hold about this much memory at most (and are at most ``chunk_size`` rows):
they wait in memory until its window closes (`copy.held_per_row` measures a row's share)."""


def in_chunks(server_version: int, tables: Iterable[Table]) -> bool:
    """Whether snapshots go in chunks through the stream: when the server sends logical
    messages (14+), the watermarks' carrier; tables with a key are read in key order, the
    others by ctid. Else the whole snapshot is read in the slot's exported snapshot at
    creation (`snapshot`)."""
    return server_version >= MESSAGES_VERSION


class Backfills:
    """A feed's back-fills beside the stream.

    ``connection`` gives the feed's plain connection (autocommit); ``tables`` are the feed's;
    ``save(states)`` records progress (a dict of OID -> state, "done" for finished tables);
    ``ledger``, the feed's, is held back while rows to read again are not recorded.
    """

    def __init__(
        self, slot: str, tables: WatchedTables, connection: Callable[[], psycopg.Connection],
        *, chunk_size: int, markers: bool, save: Callable[[dict[str, Any]], None],
        chunk_bytes: int = CHUNK_BYTES, ledger: AckLedger | None = None,
    ) -> None:
        self.slot = slot
        self.ledger = ledger
        """The feed's: the slot is held back while rows to read again are not recorded."""
        self.tables = tables
        self.connection = connection
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.markers = markers
        self.save = save
        self.read_rows = CopyReader()
        self.line_format: tuple[str, Any] | None = None
        """(format, delta model) when the feed hands out ready lines (`prefer_lines`): chunks are
        then read as JSON and come out as `Lines` (the compiled path)."""
        self.queue: deque[TableBackfill] = deque()
        self.window: ChunkWindow | None = None
        self.finished: deque[FinishedChunk] = deque()
        """Chunks handed out whose rows are not all acknowledged yet."""
        self.states: dict[str, Any] = {}
        self.last_report = 0.0
        self.recent: deque[tuple[float, str, list[Any], Change | Truncate]] = deque()
        """(when, table, key tokens, change) of the stream's changes of tables being
        back-filled, for `RECENT_SECONDS` (token None: a truncate, every key)."""
        self._names: dict[str, TableBackfill] = {}
        """Table name -> a back-fill of it (the key to read a change's key with)."""

    # -- which tables --------------------------------------------------------------------------

    def plan(
        self, conn: psycopg.Connection, meta: dict[str, Any], *, pending_only: bool = False
    ) -> None:
        """Back-fill each table whose snapshot was not delivered on this slot yet, continuing
        after the last recorded chunk of one cut short (and partitions attached with rows);
        ``pending_only``: only the back-fills recorded as begun (a feed without a snapshot
        prefeed: tables that appeared, partitions attached, back-fills requested)."""
        planned = [(table, source, state) for table, source, state
                   in backfill_states(meta, self.tables.by_oid.values())
                   if not pending_only or isinstance(state, dict)]
        if planned:
            self.states.update(meta.get("backfill") or {})
        for table, source, state in planned:
            name = self.tables.stream_names.get(table.oid, table.qualified)
            self.start(table_backfill(conn, table, name, state, source=source))

    def start(self, backfill: TableBackfill) -> None:
        """Queue ``backfill`` (replacing one of the same relation that has not begun a chunk)."""
        self.queue = deque(b for b in self.queue if b.source != backfill.source)
        self.queue.append(backfill)
        self.states[str(backfill.source)] = backfill.state()
        self._names = {queued.table: queued for queued in self.queue}

    def start_table(self, oid: int, *, source: int | None = None, markers: bool = True,
                    why: str = "") -> None:
        """Back-fill watched table ``oid`` from its first row now (or only its partition
        ``source``), saying ``why`` on stderr."""
        table = self.tables.by_oid[oid]
        name = self.tables.stream_names.get(oid, table.qualified)
        backfill = table_backfill(self.connection(), table, name, None, source=source,
                                  markers=markers)
        if why:
            log.info("%s: reading it in chunks of at most %s rows and about %s MB", why,
                     f"{self.chunk_size:,}", self.chunk_bytes >> 20)
        self.start(backfill)
        self.save(self.states)

    def renamed(self, oid: int, name: str) -> None:
        """Table ``oid``'s changes carry ``name`` from now on: so do its back-fills'."""
        for backfill in self.queue:
            if backfill.oid == oid:
                backfill.table = name
        self._names = {queued.table: queued for queued in self.queue}

    def _requested(self, content: bytes) -> None:
        for oid in requested_tables(content, self.slot):
            table = self.tables.by_oid.get(oid)
            if table is None or oid in self.tables.dropped:
                continue
            self.start_table(oid, why=f"back-fill of {table.qualified} requested")

    # -- beside the stream ---------------------------------------------------------------------

    @property
    def observer(self) -> Callable[[Change], None] | None:
        """What the stream gives each change while tables are back-filled (`observe`), or
        None when none is."""
        return self.observe if self.queue else None

    def observe(self, change: Change | Truncate) -> None:
        """A change from the stream: inside the open window its key's chunk row is stale (and
        the old key's, when an update changed the key); keys are kept a moment for the next
        chunk (see `chunks`). A truncate makes every row of the chunk stale.

        An update that leaves a TOASTed value out (`UNCHANGED`, under the default replica
        identity) and gives a row a new key is read again by key (`TableBackfill.reread`):
        the row may have moved from keys not read yet to keys read already, and the consumer
        never had its value (see also `ChunkWindow.complete_taken_rows`)."""
        table = change.table
        backfill = self._names.get(table)
        if backfill is None:
            return
        if change.__class__ is Truncate:
            tokens: list[Any] = [None]  # every key
        else:
            token = backfill.token
            tokens = [token(row) for row in (change.key, change.old) if row]
            if (len(tokens) == 2 and tokens[0] != tokens[1] and backfill.key
                    and change.operation is Operation.UPDATE
                    and UNCHANGED in change.new.values()):
                backfill.reread[tokens[0]] = change.key
                if self.ledger is not None:
                    # Until that read is recorded, the slot stays before this transaction: a
                    # feed cut short streams it again and learns of the row again.
                    self.ledger.hold(self.ledger.flush_lsn)
        window = self.window
        if window is not None and window.backfill.table == table:
            window.changed(tokens, change)
        now = time.monotonic()
        recent = self.recent
        while recent and recent[0][0] < now - RECENT_SECONDS:
            recent.popleft()
        recent.append((now, table, tokens, change))

    @property
    def due(self) -> bool:
        """Whether a chunk should start now (none open, a table waiting)."""
        return self.window is None and bool(self.queue)

    @property
    def busy(self) -> bool:
        """Whether a back-fill is under way (queued, a window open, chunks not recorded)."""
        return bool(self.queue) or self.window is not None or bool(self.finished)

    def open_chunk(self) -> None:
        """Read the next chunk and write its high watermark; the window is open from here."""
        backfill = self.queue[0]
        conn = self.connection()
        opened = time.monotonic()
        try:
            window = self._read_chunk(conn, backfill)
        except psycopg.errors.UndefinedTable as exc:  # a leaf dropped as it was planned
            log.debug("chunk of %s: %s; planning it again", backfill.table, first_line(exc))
            return
        recent = self.recent
        while recent and recent[0][0] < opened - RECENT_SECONDS:
            recent.popleft()
        for _, table, tokens, change in recent:
            if table == backfill.table:
                window.changed(tokens, change)
        self._emit(conn, window.watermark, "high")
        self.window = window

    def _read_chunk(self, conn: psycopg.Connection, backfill: TableBackfill) -> ChunkWindow:
        if backfill.reread:
            return read_again(conn, backfill, self.read_rows, chunk_bytes=self.chunk_bytes)
        line_format = self.line_format
        return read_chunk(conn, backfill, self.read_rows, chunk_size=self.chunk_size,
                          chunk_bytes=self.chunk_bytes, lines=line_format is not None,
                          keys_json=line_format is None or line_format[0] != "delta")

    def _emit(self, conn: psycopg.Connection, watermark: str, mark: str) -> None:
        content = json.dumps({"slot": self.slot, "id": watermark, "mark": mark})
        # Committed with synchronous_commit on: the walsender then sends it at once, not
        # when the WAL writer gets to it (up to wal_writer_delay later, for every chunk). One
        # round trip (a simple query of several statements), not four.
        try:
            conn.execute(sql.SQL(
                "BEGIN; SET LOCAL synchronous_commit TO on;"
                " SELECT pg_logical_emit_message(true, {}, {}); COMMIT"
            ).format(sql.Literal(WATERMARK_PREFIX), sql.Literal(content)))
        except psycopg.Error:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                conn.rollback()
            raise

    def on_message(
        self, message: Message, decoder: PgOutputDecoder
    ) -> Iterable[Any]:
        """Handle one of changefeed's own messages: a watermark closing a chunk (its rows come
        out, positioned in the watermark's transaction; on the direct path, batches of lines
        made as they are taken), or a back-fill request."""
        if message.prefix == BACKFILL_PREFIX:
            self._requested(message.content)
            return []
        window = self._watermark(message.content)
        if window is None:
            return []
        oid = window.backfill.oid
        relation = decoder.relations.get(oid)
        # The stream's version of the table if it described it, else the one the chunk was
        # read with (or, for a window made elsewhere, the catalog's now).
        version = (relation.schema_version if relation is not None
                   else window.version if window.version is not None
                   else schema_version_of(self.connection(), oid))
        table = self.tables.stream_names.get(oid, window.backfill.table)
        items: Iterable[Any]
        if window.lines and self.line_format is not None:
            fmt, model = self.line_format
            items, last = window_lines(window, table, version, decoder.next_position,
                                       markers=self.markers, fmt=fmt, model=model)
        else:
            items, last = window_changes(window, table, version, decoder.next_position,
                                         markers=self.markers)
        self.finished[-1].last_position = last
        return items

    def _watermark(self, content: bytes) -> ChunkWindow | None:
        """A watermark came through the stream: the window whose rows are due now (at its
        high watermark), else None. Watermarks of other feeds or of lost windows are ignored."""
        try:
            mark = loads_value(content)  # any message may carry the prefix: never recurse
        except ValueError:
            return None
        window = self.window
        if (not isinstance(mark, dict) or mark.get("slot") != self.slot or window is None
                or mark.get("id") != window.watermark):
            return None
        self.window = None
        backfill = window.backfill
        for token in window.rereads:
            backfill.reread.pop(token, None)
        backfill.reread.update(window.complete_taken_rows())
        if window.rereads:  # rows read again: the last key range's completion stands
            completes_table = backfill.complete_after_reread
        else:
            completes_table = window.complete
            if not completes_table:
                backfill.after = window.last_key
        # Rows still to read again come first: the table is done, and the last key range is
        # recorded, after them (a feed cut short meanwhile reads that range again).
        pending = bool(backfill.reread)
        backfill.complete_after_reread = completes_table and pending
        window.complete = completes_table and not pending
        if window.complete:
            self.queue.popleft()
            self._names = {queued.table: queued for queued in self.queue}
        self.finished.append(FinishedChunk(
            backfill, window.last_key, window.count, window.complete, window.storage,
            record=not pending))
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
            if not chunk.record:
                continue
            key = str(backfill.source)
            if chunk.complete:
                if backfill.source != backfill.oid:
                    self.states.pop(key, None)  # a partition's: nothing left to remember
                else:
                    self.states[key] = DONE
                log.info("snapshot of %s: done, %s rows in %s chunks", _described(backfill),
                         f"{backfill.done:,}", backfill.chunks)
            else:
                self.states[key] = chunk_state(backfill, chunk)
                self._report(backfill)
            changed = True
        if changed:
            self.save(self.states)
        if ledger.held is not None and not any(chunk.record is False for chunk in self.finished) \
                and not any(backfill.reread for backfill in self.queue):
            ledger.release()  # every row read again is recorded

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
                 _described(backfill), f"{backfill.done:,}", f"{total:,}", backfill.chunks,
                 rate, eta)

    def reset(self) -> None:
        """The stream restarts (reconnect): an open window and unconfirmed chunks are lost;
        their tables continue from the last recorded chunk."""
        self.window = None
        lost = list(self.finished)
        self.finished.clear()
        for chunk in reversed(lost):
            backfill = chunk.backfill
            recorded = self.states.get(str(backfill.source))
            recorded = recorded if isinstance(recorded, dict) else {}
            backfill.after = recorded.get("after")
            backfill.storage = recorded.get("storage")
            backfill.complete_after_reread = False  # (rows to read again stay: it is harmless)
            if all(queued is not backfill for queued in self.queue):
                self.queue.appendleft(backfill)
        self._names = {queued.table: queued for queued in self.queue}


def chunk_state(backfill: TableBackfill, chunk: FinishedChunk) -> dict[str, Any]:
    """The state recorded once ``chunk`` of ``backfill`` is acknowledged: after that chunk's
    last key (not the back-fill's, which may be a later chunk's already)."""
    state: dict[str, Any] = {"after": chunk.last_key, "done": backfill.done,
                             "chunks": backfill.chunks}
    if chunk.storage is not None:
        state["storage"] = chunk.storage
    if backfill.source != backfill.oid:
        state["root"] = backfill.oid
    return state


def _described(backfill: TableBackfill) -> str:
    if backfill.source == backfill.oid:
        return backfill.table
    return f"{backfill.table} (partition {backfill.source})"


def backfill_states(
    meta: dict[str, Any], tables: Iterable[Table]
) -> Iterator[tuple[Table, int, Any]]:
    """The back-fills not finished on this slot: (table, the relation to read, the recorded
    state of one cut short or None) for each table whose snapshot was not delivered yet, and
    for each partition attached with rows not read yet."""
    states = meta.get("backfill") or {}
    legacy_done = meta.get("snapshot") == DONE  # recorded by versions without back-fills
    by_oid = {table.oid: table for table in tables}
    for table in by_oid.values():
        state = states.get(str(table.oid))
        if state == DONE or (state is None and legacy_done):
            continue
        yield table, table.oid, state
    for source, state in states.items():
        if isinstance(state, dict) and state.get("root") in by_oid and source.isdigit():
            yield by_oid[state["root"]], int(source), state


def table_backfill(
    conn: psycopg.Connection, table: Table, name: str, state: Any = None, *,
    source: int | None = None, markers: bool = True,
) -> TableBackfill:
    """The back-fill of ``table`` (streamed as ``name``; only its partition ``source`` if
    given), continuing after a recorded state."""
    state = state if isinstance(state, dict) else {}
    source = source or table.oid
    return TableBackfill(
        table.oid, name, list(table.key), key_types(conn, table.oid, table.key),
        after=state.get("after"), done=state.get("done", 0), chunks=state.get("chunks", 0),
        # A recorded chunk was acknowledged, and the "started" marker before its rows with it.
        announced=state.get("chunks", 0) > 0, source=source, storage=state.get("storage"),
        markers=markers and source == table.oid,
    )


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


def key_types(conn: psycopg.Connection, oid: int, key: list[str]) -> list[str]:
    """The SQL type names of the key columns (to cast recorded text keys back)."""
    rows = dict(conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s AND attname = ANY(%s)", [oid, key],
    ).fetchall())
    return [rows[column] for column in key]
