"""The PostgreSQL feed: logical replication over psycopg 3's streaming protocol, pgoutput.

One feed = one replication slot + one publication, both named ``changefeed_<name>`` by default,
created on first run and reused after. The publication lists the watched tables and publishes
only the selected operations, so the server does not even send the rest.

Flow of `PostgresChangeFeed.run_changefeed()`:

1. A plain connection checks what can be checked up front, so mistakes end with one clear
   line: wal_level, the tables, the publication (created when missing), the slot's state.
2. A replication connection creates the slot when missing (exporting its snapshot when the
   prefeed is ``"snapshot"``: the table is then read in that snapshot, so the stream continues
   exactly where the read ended, with no gap and no duplicate).
3. ``START_REPLICATION`` streams XLogData; `pgoutput.PgOutputDecoder` turns it into changes.

Acknowledgement: the slot's confirmed position only moves to the end of a transaction once every
change of that transaction has been acknowledged, so a crash replays a partly delivered
transaction and never skips part of one; changes at or before the feed's acknowledged position
are dropped on replay. When nothing is pending, keepalives advance the slot, so an idle feed
does not make the server keep WAL.

Old rows: PostgreSQL sends the old row's key columns only (REPLICA IDENTITY DEFAULT), or the
whole old row under ``ALTER TABLE ... REPLICA IDENTITY FULL``.
"""

from __future__ import annotations

import json
import logging
import re
import select
import struct
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.rows import dict_row

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.backfill import (
    BACKFILL_PREFIX,
    WATERMARK_PREFIX,
    Backfiller,
    TableBackfill,
    key_types,
)
from changefeed.backends.postgres.loading import query_rows, read_rows
from changefeed.backends.postgres.names import (
    check_publication_name,
    check_slot_name,
    default_slot_name,
    legacy_slot_name,
    parse_table_name,
    split_tables,
)
from changefeed.backends.postgres.pgoutput import (
    Begin,
    Commit,
    PgOutputDecoder,
    Renamed,
    Truncate,
    format_lsn,
    make_position,
    parse_lsn,
    psycopg_loaders,
)
from changefeed.backends.postgres.values import SESSION_SETTINGS
from changefeed.change import ALL, Change, Operation, SnapshotState
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    TransientBackendError,
    first_line,
)
from changefeed.feed import ChangeFeed
from changefeed.message import Message
from changefeed.preflight import check_postgresql_dsn
from changefeed.registry import register_backend

log = logging.getLogger("changefeed.postgres")

_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!QqB")
_STANDBY_STATUS = struct.Struct("!cQQQqB")
PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds

_UTC = SESSION_SETTINGS
"""Sessions that read rows use UTC: timestamptz values then become datetimes in UTC whatever the
server's TimeZone (and psycopg loads them twice as fast as in a named zone); the other settings
fix the text of dates, intervals, floats and money (see `values.SESSION_SETTINGS`)."""

_OWN_PREFIXES = (WATERMARK_PREFIX, BACKFILL_PREFIX)
"""Messages changefeed writes for itself (see `backfill`): handled, never handed out."""
_SNAPSHOT_PENDING = "pending"
_SNAPSHOT_DONE = "done"
DROP_CHECK_SECONDS = 5.0
"""While the stream is quiet, check this often that the watched tables still exist."""
RETAINED_WARNING_BYTES = 1 << 30
"""`run` warns at start when its slot keeps more WAL than this (see `changefeed slots`)."""


def slot_name_for(name: str) -> str:
    """The default slot (and publication) name for a table name or a comma-separated list."""
    return default_slot_name([parse_table_name(t) for t in split_tables(name)])


class PostgresChangeFeed(ChangeFeed):
    """Changes of one or more PostgreSQL tables, through logical replication (pgoutput).

    Args:
        table: a table name (``tasks``, ``app.tasks``, ``"Mixed Case"``), a pattern
            (``public.*``, ``app.order_?``), a comma-separated list of them, or a list.
        operation: the operations to emit (`Operation` flags).
        prefeed: an iterable replayed first, or ``"snapshot"``: on the first run (when the slot
            is created) every row of the tables as a snapshot insert, then the stream from the
            exact point of that snapshot.
        connection: a libpq URL or conninfo string, or a psycopg connection to take it from.
        slot: the replication slot name (default ``changefeed_<name or tables>``); the
            publication gets the same name unless ``publication`` is given.
        status_interval: seconds between standby status updates while streaming.
        snapshot_batch: rows per snapshot chunk (see `changefeed.backends.postgres.backfill`).
        exclude: tables or patterns to leave out of ``table``'s.
        snapshot_markers: also yield a `SnapshotState` where each table's snapshot starts and
            where it is done.
        messages: prefixes of the ``pg_logical_emit_message`` messages to stream as `Message`
            objects among the changes (a prefix matches by ``startswith``; "" matches all).
            Needs PostgreSQL 14 or later.
        Other arguments as for `ChangeFeed`.
    """

    supports_snapshot = True
    resume = "server"  # the slot keeps the confirmed position

    def __init__(
        self,
        table: str | Sequence[str],
        operation: int = ALL,
        *,
        connection: Any = None,
        slot: str | None = None,
        publication: str | None = None,
        status_interval: float = 10.0,
        snapshot_batch: int = 5000,
        exclude: str | Sequence[str] = (),
        snapshot_markers: bool = False,
        messages: Sequence[str] = (),
        **options: Any,
    ) -> None:
        tables = split_tables(table)
        if not tables:
            raise ConfigurationError("no table given")
        super().__init__(",".join(tables), operation, connection=connection, **options)
        self.tables = tables
        self.table_names = [parse_table_name(name) for name in tables]
        self.exclude = [parse_table_name(name) for name in split_tables(exclude)]
        self.snapshot_markers = snapshot_markers
        self.dsn = _conninfo(connection)
        self._default_names = slot is None and publication is None
        if slot is None:
            name = options.get("name")
            slot = slot_name_for(name) if name else default_slot_name(self.table_names)
        self.slot = check_slot_name(slot)
        self.publication = check_publication_name(publication or self.slot)
        self.status_interval = status_interval
        self.snapshot_batch = snapshot_batch
        if isinstance(messages, str):
            messages = [messages]
        self.messages = tuple(messages)
        self.qualified_tables: list[str] = []
        self.primary_keys: dict[int, list[str]] = {}
        self._tables: dict[int, catalog.Table] | None = None  # by OID, once resolved
        self._stream_names: dict[int, str] = {}  # OID -> name as the stream last gave it
        self._dropped: dict[int, tuple[str, int]] = {}  # OID -> (name, WAL position seen gone)
        self._slot_known = False  # the slot existed (or was made) on an earlier connection
        self._meta: dict[str, Any] = {}
        self._server_version = 0
        self._chunk_loaders: Any = None  # for back-fill chunks, per plain connection
        self._backfiller = Backfiller(
            self.slot, snapshot_batch, self._plain_connection, self._read_chunk,
            lambda oid: self._tables[oid].identifier if self._tables else sql.Identifier(""),
            self._save_backfills,
        )
        self._sql: psycopg.Connection | None = None
        self._replication: psycopg.Connection | None = None
        self._connected_before = False
        # Acknowledgement bookkeeping: (last change emitted in a transaction, its end LSN).
        self._pending: deque[tuple[str | None, int]] = deque()
        self._acked_position: Any = self.acknowledged
        self._flush_lsn = 0
        self._received_lsn = 0
        self._in_transaction = False
        self._snapshot_last: str | None = None
        # Messages read by keep_alive() while the consumer was busy: (nbytes, buffer) pairs
        # that the stream loop takes before reading the socket again.
        self._backlog: deque[tuple[int, Any]] = deque()
        self._backlog_bytes = 0  # of XLogData in the backlog: > 0 means undelivered data
        self._streaming: pq.abc.PGconn | None = None  # set while START_REPLICATION runs
        self._last_status = 0.0

    # -- the stream ----------------------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        first_connection = not self._connected_before
        try:
            conn = self._sql = self._connect(replication=False)
            self._check_server(conn)
            self._check_messages(conn)
            if first_connection:
                self._choose_names(conn)
                self._backfiller.slot = self.slot
            repl = self._replication = self._connect_replication(conn, first_connection)
            slot = catalog.get_slot(conn, self.slot)
            self._check_slot(conn, slot, first_connection)
            created_publication = self._ensure_publication(conn)
        except psycopg.OperationalError as exc:
            if first_connection:
                raise PermanentBackendError(_connect_failure(exc, self.dsn)) from exc
            raise
        self._connected_before = True
        self.mark_connected()

        if slot is not None and self.prefeed == "snapshot" and (
            self._meta.get("snapshot") == _SNAPSHOT_PENDING
        ):
            log.warning("the snapshot of slot %s never completed: taking it again", self.slot)
            conn.execute("SELECT pg_drop_replication_slot(%s)", [self.slot])
            slot = None
        elif slot is None and self._slot_known:
            raise ResumeError(
                f"slot {self.slot} was dropped while the feed ran: the changes after its last"
                " position are gone; start again (with --prefeed snapshot to re-read the tables)"
            )
        if slot is None:
            exported = self.prefeed == "snapshot" and not self._chunked_snapshots
            try:
                snapshot_name = self._create_slot(repl, export_snapshot=exported)
            except BaseException:
                if created_publication:  # leave nothing behind of a feed that never started
                    catalog.drop_publication(conn, self.publication)
                raise
            self._slot_known = True
            if exported:
                yield from self._read_snapshot(snapshot_name)
        self._slot_known = True
        if first_connection and self.prefeed == "snapshot" and self._chunked_snapshots:
            self._plan_backfills(conn)
        yield from self._stream(repl)

    @property
    def _chunked_snapshots(self) -> bool:
        """Snapshots go in key chunks through the stream (see `backfill`) when the server
        sends logical messages (14+) and every table has a primary key; else the whole
        snapshot is read in the slot's exported snapshot at creation."""
        tables = self._tables.values() if self._tables else []
        return self._server_version >= 140000 and all(table.key for table in tables)

    def _plan_backfills(self, conn: psycopg.Connection) -> None:
        """Back-fill each table whose snapshot was not delivered on this slot yet, continuing
        after the last recorded chunk of one cut short."""
        states = self._meta.get("backfill") or {}
        legacy_done = self._meta.get("snapshot") == _SNAPSHOT_DONE
        for oid, table in (self._tables or {}).items():
            state = states.get(str(oid))
            if state == "done" or (state is None and legacy_done):
                continue
            self._backfiller.states.update(states)
            self._backfiller.start(self._table_backfill(conn, table, state))

    def _table_backfill(
        self, conn: psycopg.Connection, table: catalog.Table, state: Any
    ) -> TableBackfill:
        state = state if isinstance(state, dict) else {}
        return TableBackfill(
            table.oid, self._stream_names.get(table.oid, table.qualified), list(table.key),
            key_types(conn, table.oid, table.key), after=state.get("after"),
            done=state.get("done", 0), chunks=state.get("chunks", 0),
        )

    def _plain_connection(self) -> psycopg.Connection:
        if self._sql is None or self._sql.closed:
            self._sql = self._connect(replication=False)
        return self._sql

    def _read_chunk(
        self, conn: psycopg.Connection, query: sql.Composed, size: int
    ) -> list[dict[str, Any]]:
        """A back-fill chunk's rows as dicts (one short statement, in its own transaction),
        loaded by the stream's own loaders: the same values as streamed rows."""
        if self._chunk_loaders is None or self._chunk_loaders.catalog is not conn:
            conn.execute(_UTC)  # the settings the loaders expect of values' text
            self._chunk_loaders = psycopg_loaders(conn, catalog=conn)
        return query_rows(conn, query, self._chunk_loaders)

    def _save_backfills(self, states: dict[str, Any]) -> None:
        self._meta["backfill"] = dict(states)
        try:
            catalog.write_meta(self._plain_connection(), self.publication, self._meta)
        except psycopg.Error as exc:
            log.warning("could not record back-fill progress on %s: %s", self.publication,
                        first_line(exc))

    def _on_message(
        self, message: Message, decoder: PgOutputDecoder
    ) -> Iterator[Change | SnapshotState]:
        """Handle changefeed's own messages: watermarks and back-fill requests."""
        if message.prefix == WATERMARK_PREFIX:
            window = self._backfiller.watermark(message.content)
            if window is None:
                return
            backfill = window.backfill
            table = self._stream_names.get(backfill.oid, backfill.table)
            markers = self.snapshot_markers
            started = markers and not backfill.announced
            backfill.announced = True
            if started:
                yield SnapshotState(table, "started", decoder.next_position())
            positions = [decoder.next_position() for _ in window.rows]
            if markers and window.complete:
                positions.append(decoder.next_position())
            self._backfiller.handed_out(positions[-1] if positions else None)
            relation = decoder.relations.get(backfill.oid)
            version = (relation.schema_version if relation is not None
                       else catalog.schema_version_of(self._plain_connection(), backfill.oid))
            for row, position in zip(window.rows.values(), positions, strict=False):
                key = {column: row[column] for column in backfill.key}
                yield Change(Operation.INSERT, table, row, None, key, position, None, None, True,
                             None, version)
            if markers and window.complete:
                yield SnapshotState(table, "done", positions[-1])
        elif message.prefix == BACKFILL_PREFIX:
            self._backfill_requested(message.content)

    def _backfill_requested(self, content: bytes) -> None:
        try:
            request = json.loads(content)
        except ValueError:
            return
        if not isinstance(request, dict) or request.get("slot") != self.slot:
            return
        conn = self._plain_connection()
        for oid in request.get("tables") or []:
            table = (self._tables or {}).get(oid)
            if table is None or oid in self._dropped:
                continue
            if not table.key:
                log.warning("cannot back-fill %s: it has no primary key", table.qualified)
                continue
            log.info("back-fill of %s requested: reading it in chunks of %s rows",
                     table.qualified, f"{self.snapshot_batch:,}")
            self._backfiller.start(self._table_backfill(conn, table, None))

    def _stream(self, repl: psycopg.Connection) -> Iterator[Change | None]:
        pgconn = repl.pgconn
        # Messages are always asked for where the server has them (14+), wanted or not: they
        # carry the back-fills' watermarks and requests, and a transactional one takes an index
        # among its transaction's changes, so positions stay the same whichever prefixes a run
        # asks for.
        messages = sql.SQL(", messages 'true'" if self._server_version >= 140000 else "")
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}{})"
        ).format(sql.Identifier(self.slot), sql.Literal(self.publication), messages)
        pgconn.send_query(command.as_bytes(repl))
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = _text(result.error_message if result else b"") or _text(
                pgconn.get_error_message()
            )
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            raise self._slot_error(_text(sqlstate), message)
        self._pending.clear()
        self._in_transaction = False
        self._backlog.clear()
        self._backlog_bytes = 0
        self._streaming = pgconn
        start = self._slot_position(self._sql) if self._sql else None
        log.info(
            "streaming %s from slot %s at %s (publication %s)",
            ", ".join(self.qualified_tables), self.slot, start or "?", self.publication,
        )

        decoder = PgOutputDecoder(
            self.operation,
            # User types (domains, enums, composites, ranges) are looked up on a plain
            # connection, opened only when a Relation names one not seen yet.
            loaders=psycopg_loaders(repl, catalog=lambda: self._connect(replication=False)),
            tables=self._stream_names,
            primary_keys=self.primary_keys,
            messages=(*self.messages, *_OWN_PREFIXES) if self._server_version >= 140000 else (),
        )
        decode = decoder.decode
        acknowledged = self.acknowledged
        skip_until = acknowledged if isinstance(acknowledged, str) else None
        stats = self.stats
        sock = pgconn.socket
        self._last_status = time.monotonic()
        last_emitted: str | None = None
        get_copy_data = pgconn.get_copy_data
        backlog = self._backlog
        last_table_check = time.monotonic()
        backfiller = self._backfiller
        backfiller.reset()  # a window of the previous connection is lost: its chunk comes again
        # While tables are back-filled, their changes go to the back-filler (see `backfill`).
        observe = backfiller.observe if backfiller.queue else None

        # The hot loop: one iteration per message, hundreds of thousands a second.
        while True:
            if backlog:  # read by keep_alive() while the consumer was busy: those come first
                nbytes, buffer = backlog.popleft()
                if nbytes > 0 and buffer[0] == 119:
                    self._backlog_bytes -= nbytes
            else:
                nbytes, buffer = get_copy_data(1)
            if nbytes > 0:
                if buffer[0] == 119:  # 'w' XLogData: header, then one pgoutput message
                    event = decode(buffer[25:])
                    if event is None:
                        continue
                    if event.__class__ is Change:
                        last_emitted = event.position
                        if observe is not None:
                            observe(event)
                        if skip_until is None or last_emitted > skip_until:
                            yield event
                    elif event.__class__ is Begin:
                        self._in_transaction = True
                        last_emitted = None
                    elif event.__class__ is Commit:
                        self._in_transaction = False
                        _, wal_end, _ = _XLOGDATA.unpack_from(buffer, 1)
                        self._received_lsn = event.end_lsn
                        stats.lag_bytes = max(0, wal_end - event.end_lsn)
                        if backfiller.finished:
                            backfiller.committed(event.end_lsn)
                        self._pending.append((last_emitted, event.end_lsn))
                        self._advance()
                        if backfiller.due:
                            backfiller.open_chunk()
                            observe = backfiller.observe if backfiller.queue else None
                    elif event.__class__ is Message:
                        if event.prefix.startswith(_OWN_PREFIXES):  # watermarks, requests
                            for change in self._on_message(event, decoder):
                                last_emitted = change.position
                                yield change
                            observe = backfiller.observe if backfiller.queue else None
                            continue
                        if self._in_transaction:
                            last_emitted = event.position
                        else:  # no Commit follows: once acknowledged, the slot may pass it
                            self._received_lsn = max(self._received_lsn, event.lsn)
                            self._pending.append((event.position, event.lsn))
                        if skip_until is None or event.position > skip_until:
                            yield event
                    elif event.__class__ is Truncate:
                        log.warning("TRUNCATE of %s is not emitted as changes",
                                    ", ".join(event.tables))
                    elif event.__class__ is Renamed:
                        log.warning("table %s is now %s: its changes go on under the new name",
                                    event.old_name, event.new_name)
                        self._stream_names[event.oid] = event.new_name
                elif buffer[0] == 107:  # 'k' keepalive
                    wal_end, _, reply_requested = _KEEPALIVE.unpack_from(buffer, 1)
                    stats.lag_bytes = max(0, wal_end - self._received_lsn)
                    if not self._pending and not self._in_transaction:
                        # Everything received is delivered: let the slot move to the server's end.
                        self._flush_lsn = max(self._flush_lsn, wal_end)
                        self._received_lsn = max(self._received_lsn, wal_end)
                    if reply_requested:
                        self._send_status(pgconn)
                continue
            if nbytes < 0:
                raise self._stream_ended(pgconn, nbytes)
            yield None  # caught up: the consumer may flush and acknowledge now
            if backlog:
                continue
            now = time.monotonic()
            if now - last_table_check >= DROP_CHECK_SECONDS and self._sql is not None:
                last_table_check = now
                self._note_dropped_tables(self._sql)
            if self._dropped:
                self._end_if_dropped_tables_delivered(pgconn)
            if backfiller.due:
                backfiller.open_chunk()
                observe = backfiller.observe if backfiller.queue else None
            if now - self._last_status >= self.status_interval or self._flush_due:
                self._send_status(pgconn)
            readable, _, _ = select.select([sock], [], [], 1.0)
            if not readable:
                yield None
            pgconn.consume_input()

    # -- while the consumer is busy ------------------------------------------------------------

    BACKLOG_LIMIT = 64 * 1024 * 1024
    """Bytes of stream keep_alive() holds before it lets go of the connection instead."""

    def keep_alive(self) -> None:
        """Read the stream into a backlog and answer the server while the consumer is busy.

        The walsender ends a connection that stays silent for ``wal_sender_timeout``, and a
        fast shutdown of the server waits until the client has confirmed everything it was
        sent. So while the consumer delivers elsewhere (a slow or retrying sink), messages are
        read into a backlog that the stream loop takes first once it is asked for changes
        again, and keepalives are answered: the write position is what was received; the
        flush position is the acknowledged one, or, while something received is not yet
        delivered, left unset (0), which PostgreSQL ignores for the slot and which lets a
        shutting-down walsender judge by the write position. The slot keeps its confirmed
        position, so nothing is lost. A backlog over `BACKLOG_LIMIT` ends the connection
        instead (the server is free; the feed reconnects from the slot when the consumer is back).
        """
        pgconn = self._streaming
        if pgconn is None or self._replication is None or self._replication.closed:
            return
        backlog = self._backlog
        try:
            pgconn.consume_input()
            while self._backlog_bytes <= self.BACKLOG_LIMIT:
                nbytes, buffer = pgconn.get_copy_data(1)
                if nbytes == 0:
                    break
                backlog.append((nbytes, buffer))
                if nbytes < 0:  # the stream ended: the loop reports it in its turn
                    self._streaming = None
                    return
                if buffer[0] == 119:  # 'w' XLogData
                    self._backlog_bytes += nbytes
                    self._received_lsn = max(self._received_lsn,
                                             _XLOGDATA.unpack_from(buffer, 1)[0])
                elif buffer[0] == 107:  # 'k' keepalive: the stream loop sees it again later
                    wal_end, _, reply_requested = _KEEPALIVE.unpack_from(buffer, 1)
                    if reply_requested:
                        self._answer_while_busy(pgconn, wal_end)
            if self._backlog_bytes > self.BACKLOG_LIMIT:
                log.warning(
                    "the sink is behind by more than %s MB of stream: closing the replication"
                    " connection until it catches up", self.BACKLOG_LIMIT // 2**20,
                )
                self._send_status(pgconn)
                self._streaming = None
                self._replication.close()
                return
            if time.monotonic() - self._last_status >= min(self.status_interval, 5.0):
                self._send_status(pgconn)
        except psycopg.Error as exc:  # the stream loop meets the same failure and reconnects
            log.debug("keep_alive: %s", first_line(exc))
            self._streaming = None

    def _answer_while_busy(self, pgconn: pq.abc.PGconn, wal_end: int) -> None:
        undelivered = self._backlog_bytes > 0 or self._in_transaction or bool(self._pending)
        if undelivered:
            self._send_status(pgconn, written=max(self._received_lsn, wal_end), flush=0)
        else:
            self._flush_lsn = max(self._flush_lsn, wal_end)
            self._received_lsn = max(self._received_lsn, wal_end)
            self._send_status(pgconn)

    # -- acknowledgement -----------------------------------------------------------------------

    def on_acknowledge(self, position: Any) -> None:
        self._acked_position = position
        self._advance()
        if self._replication is None and self._flush_lsn > self._sent_flush:
            self._advance_slot()

    def _advance_slot(self) -> None:
        """Record on the slot an acknowledgement that came after the stream closed.

        A consumer that stops (``--limit``, a signal, an idle timeout) leaves `changes()`, which
        closes the stream, before it flushes and acknowledges its last output; without this
        the next run would repeat those changes. The walsender may still be exiting for a
        moment, keeping the slot busy: try for a few seconds.
        """
        lsn = format_lsn(self._flush_lsn)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(
                        "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", [self.slot, lsn]
                    )
                self._sent_flush = self._flush_lsn
                return
            except psycopg.errors.ObjectInUse:  # our walsender has not gone yet
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                error: Exception = TimeoutError("the slot stayed in use")
            except psycopg.Error as exc:
                error = exc
            log.warning(
                "could not record the last acknowledgement (%s) on slot %s: %s; the changes"
                " after the slot's position will come again", lsn, self.slot, first_line(error),
            )
            return

    def _advance(self) -> None:
        """Move the flush LSN past every transaction whose emitted changes are all acknowledged."""
        pending = self._pending
        acked = self._acked_position
        while pending:
            last, end_lsn = pending[0]
            if last is not None and (acked is None or last > acked):
                break
            pending.popleft()
            self._flush_lsn = max(self._flush_lsn, end_lsn)
        if self._backfiller.finished:
            acked = self._acked_position
            self._backfiller.confirmed(self._flush_lsn, acked if isinstance(acked, str) else None)
        if (
            self._snapshot_last is not None
            and acked is not None
            and acked >= self._snapshot_last
        ):
            self._snapshot_last = None
            self._mark_snapshot(_SNAPSHOT_DONE)

    @property
    def _flush_due(self) -> bool:
        return self._flush_lsn > self._sent_flush

    _sent_flush = 0

    def _send_status(
        self, pgconn: pq.abc.PGconn, *, written: int | None = None, flush: int | None = None,
        reply: bool = False,
    ) -> None:
        """Send a standby status update: received up to ``written``, delivered up to ``flush``
        (default: the acknowledged position; 0 tells the server nothing about delivery);
        ``reply`` asks the server for a keepalive telling how far its WAL goes."""
        now_us = int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US
        if flush is None:
            flush = self._flush_lsn
        if written is None:
            written = max(self._received_lsn, flush)
        message = _STANDBY_STATUS.pack(b"r", written, flush, flush, now_us, int(reply))
        if pgconn.put_copy_data(message) != 1 or pgconn.flush() != 0:
            raise psycopg.OperationalError(
                _text(pgconn.get_error_message()) or "could not send the standby status"
            )
        self._last_status = time.monotonic()
        if flush:
            self._sent_flush = flush

    def close(self) -> None:
        repl = self._replication
        if repl is not None and not repl.closed:
            if repl.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
                try:  # tell the server what was delivered before going away
                    self._send_status(repl.pgconn)
                except psycopg.Error:
                    pass
            repl.close()
        self._replication = None
        self._streaming = None
        self._backlog.clear()
        self._backlog_bytes = 0
        self._close_sql()

    def _close_sql(self) -> None:
        if self._sql is not None and not self._sql.closed:
            self._sql.close()
        self._sql = None

    # -- setup ---------------------------------------------------------------------------------

    def _connect(self, *, replication: bool) -> psycopg.Connection:
        options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self.dsn:
            options["connect_timeout"] = 10
        if replication:
            options["replication"] = "database"
        try:
            conn = psycopg.connect(self.dsn, **options)
            conn.execute(_UTC)
            return conn
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
        except psycopg.OperationalError as exc:
            # libpq's own complaints about the connection string (no server involved)
            if "connection option" in str(exc) or "invalid URI" in str(exc):
                raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
            raise

    def _connect_replication(
        self, conn: psycopg.Connection, first_connection: bool
    ) -> psycopg.Connection:
        """The replication connection; when the server refuses it, say why from the catalog
        (libpq gives no SQLSTATE for a refused connection, and its text is localised)."""
        try:
            return self._connect(replication=True)
        except psycopg.OperationalError as exc:
            may_replicate, user, senders, max_senders = conn.execute(
                "SELECT r.rolreplication OR r.rolsuper, current_user,"
                " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'),"
                " current_setting('max_wal_senders')::int"
                " FROM pg_roles r WHERE r.rolname = current_user"
            ).fetchone() or (True, "?", 0, 1)
            if not may_replicate:
                raise PermanentBackendError(
                    f"role {user!r} lacks the REPLICATION privilege: as a superuser run"
                    f" ALTER ROLE {_identifier(user, conn)} REPLICATION"
                ) from exc
            if senders >= max_senders:
                message = (
                    f"all {max_senders} WAL senders of the server are in use: raise"
                    " max_wal_senders (and max_replication_slots) and restart PostgreSQL, or"
                    " stop feeds that are not needed (changefeed slots)"
                )
                if first_connection:
                    raise PermanentBackendError(message) from exc
                raise TransientBackendError(message) from exc
            raise

    def _check_server(self, conn: psycopg.Connection) -> None:
        """wal_level, then the tables: by name on the first connection, by OID afterwards."""
        self._server_version = conn.info.server_version
        (wal_level,) = conn.execute("SHOW wal_level").fetchone() or ("?",)
        if wal_level != "logical":
            raise PermanentBackendError(
                f"wal_level is {wal_level!r} but logical replication needs 'logical': run"
                " ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
            )
        if self._tables is None:
            resolved = catalog.resolve_tables(conn, self.table_names, self.exclude)
            self._tables = {table.oid: table for table in resolved}
            self._stream_names = {table.oid: table.qualified for table in resolved}
        else:
            self._note_dropped_tables(conn)
        self.qualified_tables = [table.qualified for table in self._tables.values()]
        self.primary_keys = {oid: table.key for oid, table in self._tables.items()}

    def _note_dropped_tables(self, conn: psycopg.Connection) -> None:
        """Note watched tables that no longer exist, and the WAL position at which they were
        seen gone: the feed delivers every change up to there, then ends (see `_stream`)."""
        assert self._tables is not None
        found = catalog.tables_by_oid(conn, list(self._tables))
        gone = [oid for oid in self._tables if oid not in found and oid not in self._dropped]
        if not gone:
            return
        (lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("0/0",)
        for oid in gone:
            name = self._stream_names.get(oid) or self._tables[oid].qualified
            self._dropped[oid] = (name, parse_lsn(lsn))
            log.warning("table %s was dropped: delivering its changes up to %s, then stopping",
                        name, lsn)

    def _end_if_dropped_tables_delivered(self, pgconn: pq.abc.PGconn) -> None:
        """End the feed once everything up to the drop of a watched table is acknowledged."""
        until = max(lsn for _, lsn in self._dropped.values())
        if self._received_lsn >= until and not self._pending and not self._in_transaction:
            self._send_status(pgconn)
            names = ", ".join(sorted(name for name, _ in self._dropped.values()))
            raise PermanentBackendError(
                f"table {names} was dropped: every change before the drop was delivered;"
                f" drop the feed's slot (changefeed slots --drop {self.slot}) if it is not"
                " needed any more"
            )
        self._send_status(pgconn, reply=True)  # the reply tells how far the server's WAL goes

    def _choose_names(self, conn: psycopg.Connection) -> None:
        """With default names, continue the slot that already serves these tables (found by
        OID: a table renamed since keeps its slot; or named by an earlier version)."""
        tables = list(self._tables.values()) if self._tables else []
        if not self._default_names or catalog.get_slot(conn, self.slot) is not None:
            return
        found = catalog.find_default_slot(conn, tables, [legacy_slot_name(self.tables)])
        if found is not None and found[0] != self.slot:
            log.warning("continuing slot %s, which streams %s (under an earlier name)",
                        found[0], ", ".join(t.qualified for t in tables))
            self.slot, self.publication = found

    def _ensure_publication(self, conn: psycopg.Connection) -> bool:
        """Create the publication or bring it to the feed's operations; True if created.

        Refuses, before changing anything, tables whose UPDATE/DELETE would then fail and a
        publication that serves other tables or another slot.
        """
        tables = [t for oid, t in (self._tables or {}).items() if oid not in self._dropped]
        publication = catalog.get_publication(conn, self.publication)
        if publication is not None:
            catalog.check_publication(conn, publication, tables, self.slot, self.operation)
        catalog.check_slot_owner(conn, self.slot, self.publication, tables)
        catalog.check_replica_identity(conn, tables, self.operation)
        meta = dict(publication.meta) if publication is not None else {}
        if meta.get("slot", self.slot) == self.slot:  # the record is of the slot that made it
            meta.update(slot=self.slot, default=self._default_names,
                        tables={str(t.oid): t.qualified for t in tables})
        try:
            if publication is None:
                catalog.create_publication(conn, self.publication, tables, self.operation, meta)
                log.info("created publication %s for %s (%s)", self.publication,
                         ", ".join(self.qualified_tables), ", ".join(self.operation.names))
            else:
                catalog.update_publication(conn, publication, self.operation)
                if publication.table_oids != {t.oid for t in tables}:
                    self._change_tables(conn, publication, tables, meta)
                if meta != publication.meta:
                    catalog.write_meta(conn, self.publication, meta)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PermanentBackendError(
                f"cannot set up publication {self.publication}: {first_line(exc)}; the tables'"
                f" owner can run: CREATE PUBLICATION {self.publication} FOR TABLE"
                f" {', '.join(self.qualified_tables)} WITH (publish ="
                f" '{', '.join(self.operation.names)}', publish_via_partition_root = true)"
            ) from exc
        self._meta = meta
        return publication is None

    def _change_tables(
        self, conn: psycopg.Connection, publication: catalog.Publication,
        tables: list[catalog.Table], meta: dict[str, Any],
    ) -> None:
        """The slot's own publication gets the feed's new list of tables; with a snapshot
        prefeed, each added table is back-filled while the others stream on."""
        added, removed = catalog.set_publication_tables(conn, publication, tables)
        states = dict(meta.get("backfill") or {})
        for oid in removed:
            states.pop(str(oid), None)
        for table in added:
            if self.prefeed == "snapshot":
                states[str(table.oid)] = {"after": None, "done": 0, "chunks": 0}
        meta["backfill"] = states
        if added:
            log.warning("slot %s now also streams %s%s", self.slot,
                        ", ".join(t.qualified for t in added),
                        " (back-filled first)" if self.prefeed == "snapshot" else "")
        if removed:
            log.warning("slot %s no longer streams %s", self.slot,
                        catalog.describe_oids(conn, removed))
    def _check_messages(self, conn: psycopg.Connection) -> None:
        """pgoutput streams logical decoding messages from PostgreSQL 14 on."""
        version = conn.info.server_version
        if self.messages and version < 140000:
            raise ConfigurationError(
                f"messages need PostgreSQL 14 or later (pgoutput's messages option); this"
                f" server is {version // 10000}.{version % 10000}"
            )

    def _check_slot(
        self, conn: psycopg.Connection, slot: catalog.Slot | None, first_connection: bool
    ) -> None:
        """Raise a clear error if the slot exists but cannot be used."""
        if slot is None:
            return
        if slot.plugin != "pgoutput" or slot.database != conn.info.dbname:
            raise ConfigurationError(
                f"slot {self.slot} exists but is not a pgoutput slot of database"
                f" {conn.info.dbname!r}: choose another name with --slot"
            )
        if slot.wal_status == "lost":
            raise ResumeError(
                f"slot {self.slot} was invalidated: PostgreSQL removed WAL it still needed"
                f" (see max_slot_wal_keep_size); drop it (changefeed slots --drop {self.slot})"
                " and start again with --prefeed snapshot"
            )
        if slot.active:
            message = f"slot {self.slot} is in use by another process (pid {slot.active_pid})"
            if first_connection:
                raise PermanentBackendError(message + ": stop it, or use another --slot")
            raise TransientBackendError(message)  # likely our own previous walsender, ending
        if first_connection and (slot.retained_bytes or 0) > RETAINED_WARNING_BYTES:
            log.warning("slot %s keeps %s of WAL on the server: this feed is far behind",
                        self.slot, format_size(slot.retained_bytes or 0))

    def _slot_position(self, conn: psycopg.Connection | None) -> str | None:
        if conn is None:
            return None
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        return row[0] if row else None

    def _create_slot(self, repl: psycopg.Connection, *, export_snapshot: bool) -> str:
        """Create the slot; the name of its exported snapshot ("" without one)."""
        mode = "EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT"
        command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}").format(
            sql.Identifier(self.slot), sql.SQL(mode)
        )
        try:
            row = repl.execute(command).fetchone()
        except psycopg.errors.DuplicateObject as exc:
            raise TransientBackendError(f"slot {self.slot} was created meanwhile") from exc
        except psycopg.errors.ConfigurationLimitExceeded as exc:  # 53400
            raise PermanentBackendError(
                f"cannot create slot {self.slot}: {first_line(exc)}: raise"
                " max_replication_slots (and max_wal_senders) and restart PostgreSQL, or drop"
                " unused slots (changefeed slots --drop-inactive)"
            ) from exc
        assert row is not None
        _, consistent_point, snapshot_name, _ = row
        log.info("created replication slot %s at %s", self.slot, consistent_point)
        if export_snapshot:
            self._mark_snapshot(_SNAPSHOT_PENDING)
        return snapshot_name or ""

    # -- snapshot ------------------------------------------------------------------------------

    def _read_snapshot(self, snapshot_name: str) -> Iterator[Change | SnapshotState | None]:
        """Every row of the tables as of the slot's creation, as snapshot inserts.

        Rows are handed out one behind the read, so the last one is known as the last before
        it is yielded: once it is acknowledged, the snapshot is recorded as delivered.
        """
        previous: Change | SnapshotState | None = None
        self._snapshot_versions: dict[int, str] = {}
        index = 0
        for table, row in self._snapshot_rows(snapshot_name):
            change: Change | SnapshotState
            if isinstance(row, str):  # "started" / "done"
                if not self.snapshot_markers:
                    continue
                index += 1
                change = SnapshotState(table.qualified, row, make_position(0, index))
            else:
                index += 1
                change = Change(
                    Operation.INSERT, table.qualified, row, None,
                    {column: row[column] for column in table.key},
                    make_position(0, index), None, None, True, None,
                    self._snapshot_versions.get(table.oid),
                )
            if previous is not None:
                yield previous
            previous = change
        self.stats.extra.pop("snapshot", None)
        if previous is None:
            self._mark_snapshot(_SNAPSHOT_DONE)
            return
        self._snapshot_last = previous.position
        yield previous

    def _snapshot_rows(
        self, snapshot_name: str
    ) -> Iterator[tuple[catalog.Table, dict[str, Any] | str]]:
        """Each table's rows in the exported snapshot, between ``(table, "started")`` and
        ``(table, "done")``."""
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as reader:
            reader.execute(_UTC)
            loaders = psycopg_loaders(reader, catalog=reader)
            reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            reader.execute(
                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
            )
            for table in list(self._tables.values()) if self._tables else []:
                relation = table.identifier
                self._snapshot_versions[table.oid] = catalog.schema_version_of(reader, table.oid)
                estimate = reader.execute(  # a partitioned table: the sum of its partitions
                    "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint AS n"
                    " FROM pg_class c WHERE c.relkind = 'r' AND (c.oid = %s"
                    " OR c.oid IN (SELECT relid FROM pg_partition_tree(%s) WHERE isleaf))",
                    [table.oid, table.oid],
                ).fetchone()
                total = estimate["n"] if estimate else 0
                if total == 0:  # never analysed: count, in the same snapshot
                    counted = reader.execute(
                        sql.SQL("SELECT count(*) AS n FROM {}").format(relation)
                    ).fetchone()
                    total = counted["n"] if counted else 0
                log.info("snapshot of %s: reading ~%s rows", table.qualified, f"{total:,}")
                yield table, "started"
                started = last_report = time.monotonic()
                done = 0
                # Loaded by the stream's own loaders: the same values as streamed rows.
                query = sql.SQL("SELECT * FROM {}").format(relation)
                for row in read_rows(reader, query, loaders, self.snapshot_batch):
                    done += 1
                    yield table, row
                    now = time.monotonic()
                    if now - last_report >= 2.0:
                        last_report = now
                        self.stats.extra["snapshot"] = (table.qualified, done, total)
                        log.info("snapshot of %s: %s / ~%s rows (%.0f rows/s)",
                                 table.qualified,
                                 f"{done:,}", f"{max(total, done):,}",
                                 done / (now - started))
                log.info("snapshot of %s: %s rows done", table.qualified, f"{done:,}")
                yield table, "done"
            reader.execute("COMMIT")

    def _mark_snapshot(self, state: str) -> None:
        """Record on the publication whether the snapshot was delivered (a crash mid-snapshot
        must take it again: the slot alone cannot tell)."""
        self._meta["snapshot"] = state
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                catalog.write_meta(conn, self.publication, self._meta)
        except psycopg.Error as exc:
            log.warning("could not record the snapshot state on %s: %s", self.publication, exc)

    # -- errors --------------------------------------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        """Connection-level failures (lost connection, server shutdown, terminated walsender)."""
        if isinstance(exc, TransientBackendError):
            return True
        if isinstance(exc, (psycopg.errors.AdminShutdown, psycopg.errors.CrashShutdown,
                            psycopg.errors.CannotConnectNow)):
            return True
        return isinstance(exc, psycopg.OperationalError) and not isinstance(
            exc, psycopg.errors.ObjectNotInPrerequisiteState
        )

    def _slot_error(self, sqlstate: str, message: str) -> Exception:
        """The error for a refused START_REPLICATION, by SQLSTATE."""
        if sqlstate == "55006":  # object_in_use: our previous walsender may still be ending
            return TransientBackendError(f"slot {self.slot}: {message}")
        if sqlstate == "55000":  # object_not_in_prerequisite_state: invalidated
            return ResumeError(
                f"slot {self.slot} was invalidated ({message}); drop it"
                f" (changefeed slots --drop {self.slot}) and start again with --prefeed snapshot"
            )
        if sqlstate == "42704":  # undefined_object: the slot (or publication) is gone
            return TransientBackendError(f"slot {self.slot}: {message}")
        return psycopg.OperationalError(message or "START_REPLICATION failed")

    def _stream_ended(self, pgconn: pq.abc.PGconn, nbytes: int) -> Exception:
        message = _text(pgconn.get_error_message())
        if nbytes == -1:
            result = pgconn.get_result()
            if result is not None and result.error_message:
                message = _text(result.error_message)
        return psycopg.OperationalError(message or "the server ended the replication stream")

    def __repr__(self) -> str:
        return f"PostgresChangeFeed({self.table!r}, {self.operation!r}, slot={self.slot!r})"


# -- connection strings --------------------------------------------------------------------------


def _conninfo(connection: Any) -> str:
    if isinstance(connection, str):
        return connection
    if isinstance(connection, psycopg.Connection):
        params = connection.info.get_parameters()
        password = connection.pgconn.password
        if password:
            params["password"] = password.decode()
        return psycopg.conninfo.make_conninfo(**params)
    if connection is None:
        return ""  # libpq's defaults: PGHOST, PGDATABASE, ...
    raise ConfigurationError(f"cannot use a {type(connection).__name__} as a PostgreSQL connection")


def _identifier(name: str, conn: psycopg.Connection) -> str:
    """``name`` as SQL text, quoted only where PostgreSQL needs it."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return sql.Identifier(name).as_string(conn)


def format_size(count: int) -> str:
    """A byte count for people: ``100 bytes``, ``1.5 GB``."""
    value = float(count)
    for unit in ("bytes", "kB", "MB"):
        if value < 1024:
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _text(message: str | bytes | None) -> str:
    """libpq's messages come as bytes or str depending on the call: one stripped str."""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    return (message or "").strip()


def _connect_failure(exc: BaseException, dsn: str) -> str:
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        params = {}
    where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
    # libpq says 'connection to server at "h" (addr), port p failed: <reason>' for every
    # address it tried, each followed by hints; the reason of the last attempt is enough.
    reasons = re.findall(r"failed: (.+)", str(exc)) or [first_line(exc)]
    return f"cannot connect to PostgreSQL at {where}: {reasons[-1].strip()}"


# -- registration --------------------------------------------------------------------------------


register_backend(
    "postgres", PostgresChangeFeed, connection_types=[psycopg.Connection],
    check_url=check_postgresql_dsn,
)
