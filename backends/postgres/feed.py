"""The PostgreSQL feed: logical replication over psycopg 3's streaming protocol, pgoutput.

One feed = one replication slot + one publication, both named ``changefeed_<name>`` by default,
created on first run and reused after. The publication lists the watched tables and publishes
only the selected operations, so the server does not even send the rest.

This module is the I/O: `PostgresChangeFeed.run_changefeed()` prepares the server (`setup`,
`slots`), takes the snapshot prefeed (`snapshot`, `backfill`), then reads the stream, whose
framing `protocol` and payload `pgoutput` decode, and tells the server what the `ledger` says
was delivered. Failures are classified in `errors`.

Acknowledgement: the slot's confirmed position only moves to the end of a transaction once every
change of that transaction has been acknowledged, so a crash replays a partly delivered
transaction and never skips part of one; changes at or before the feed's acknowledged position
are dropped on replay. When nothing is pending, keepalives advance the slot, so an idle feed
does not make the server keep WAL.

Old rows: PostgreSQL sends the old row's key columns only (REPLICA IDENTITY DEFAULT), or the
whole old row under ``ALTER TABLE ... REPLICA IDENTITY FULL``.
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import pq, sql

from changefeed.backends.postgres import catalog, setup, slots, snapshot
from changefeed.backends.postgres.backfill import BACKFILL_PREFIX, WATERMARK_PREFIX, Backfiller
from changefeed.backends.postgres.errors import (
    is_transient,
    start_replication_error,
    stream_ended,
    text,
)
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.loading import psycopg_loaders
from changefeed.backends.postgres.names import (
    check_publication_name,
    check_slot_name,
    default_slot_name,
    legacy_slot_name,
    parse_table_name,
    split_tables,
)
from changefeed.backends.postgres.pgoutput import Begin, Commit, PgOutputDecoder, Renamed, Truncate
from changefeed.backends.postgres.protocol import (
    KEEPALIVE,
    XLOGDATA,
    XLOGDATA_HEADER_SIZE,
    format_lsn,
    keepalive,
    standby_status,
    xlogdata_header,
)
from changefeed.change import ALL, Change, SnapshotState
from changefeed.errors import ConfigurationError, PermanentBackendError, ResumeError, first_line
from changefeed.feed import ChangeFeed
from changefeed.message import Message
from changefeed.preflight import check_postgresql_dsn
from changefeed.registry import register_backend

log = logging.getLogger("changefeed.postgres")

_OWN_PREFIXES = (WATERMARK_PREFIX, BACKFILL_PREFIX)
"""Messages changefeed writes for itself (see `backfill`): handled, never handed out."""
DROP_CHECK_SECONDS = 5.0
"""While the stream is quiet, check this often that the watched tables still exist."""


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

    BACKLOG_LIMIT = 64 * 1024 * 1024
    """Bytes of stream keep_alive() holds before it lets go of the connection instead."""

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
        self.dsn = setup.conninfo(connection)
        self._default_names = slot is None and publication is None
        if slot is None:
            name = options.get("name")
            slot = slot_name_for(name) if name else default_slot_name(self.table_names)
        self.slot = check_slot_name(slot)
        self.publication = check_publication_name(publication or self.slot)
        self.status_interval = status_interval
        self.snapshot_batch = snapshot_batch
        self.messages = tuple([messages] if isinstance(messages, str) else messages)
        self._tables: dict[int, catalog.Table] = {}  # by OID, once resolved
        self._stream_names: dict[int, str] = {}  # OID -> name as the stream last gave it
        self._dropped: dict[int, tuple[str, int]] = {}  # OID -> (name, WAL position seen gone)
        self._slot_known = False  # the slot existed (or was made) on an earlier connection
        self._meta: dict[str, Any] = {}  # the publication's record (see `catalog`)
        self._server_version = 0
        self._backfiller = Backfiller(
            self.slot, snapshot_batch, self._plain_connection, snapshot.ChunkReader(),
            lambda oid: self._tables[oid].identifier,
            lambda states: snapshot.save_backfills(
                self._plain_connection, self.publication, self._meta, states),
        )
        self._sql: psycopg.Connection | None = None
        self._replication: psycopg.Connection | None = None
        self._ledger = AckLedger(self.acknowledged)
        self._flush_at_stream_close = 0
        # Messages read by keep_alive() while the consumer was busy: (nbytes, buffer) pairs
        # that the stream loop takes before reading the socket again.
        self._backlog: deque[tuple[int, Any]] = deque()
        self._backlog_bytes = 0  # of XLogData in the backlog: > 0 means undelivered data
        self._streaming: pq.abc.PGconn | None = None  # set while START_REPLICATION runs
        self._last_status = 0.0

    # -- setup ---------------------------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        first_connection = not self.connected_once
        conn = self._sql = setup.connect(self.dsn)
        self._server_version = setup.check_server(conn)
        self._check_tables(conn)
        setup.check_messages(conn, self.messages)
        if first_connection:
            if self._default_names:
                names = setup.choose_names(conn, self.slot, list(self._tables.values()),
                                           legacy_slot_name(self.tables))
                if names is not None:
                    self.slot, self.publication = names
            self._backfiller.slot = self.slot
        repl = self._replication = setup.connect_replication(self.dsn, conn)
        slot = slots.get_slot(conn, self.slot)
        slots.check_slot(conn, slot, first_connection=first_connection)
        publication = setup.ensure_publication(
            conn, self.publication, [t for oid, t in self._tables.items() if oid not in
                                     self._dropped],
            slot=self.slot, operation=self.operation, default_names=self._default_names,
            backfill_added=self.prefeed == "snapshot",
        )
        self._meta = publication.meta
        self.mark_connected()

        if slot is not None and self.prefeed == "snapshot" and (
            self._meta.get("snapshot") == snapshot.PENDING
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
                snapshot_name = slots.create_slot(repl, self.slot, export_snapshot=exported)
            except BaseException:
                if publication.created:  # leave nothing behind of a feed that never started
                    catalog.drop_publication(conn, self.publication)
                raise
            self._slot_known = True
            if exported:
                snapshot.mark(self.dsn, self.publication, self._meta, snapshot.PENDING)
                yield from self._read_snapshot(snapshot_name)
        self._slot_known = True
        if first_connection and self.prefeed == "snapshot" and self._chunked_snapshots:
            self._plan_backfills(conn)
        yield from self._stream(repl)

    def _check_tables(self, conn: psycopg.Connection) -> None:
        """Resolve the tables by name on the first connection, check them by OID afterwards."""
        if not self._tables:
            resolved = catalog.resolve_tables(conn, self.table_names, self.exclude)
            self._tables = {table.oid: table for table in resolved}
            self._stream_names = {table.oid: table.qualified for table in resolved}
        else:
            self._note_dropped_tables(conn)

    def _note_dropped_tables(self, conn: psycopg.Connection) -> None:
        """Note watched tables that no longer exist, and the WAL position at which they were
        seen gone: the feed delivers every change up to there, then ends (see `_stream`)."""
        watched = [oid for oid in self._tables if oid not in self._dropped]
        gone, lsn = setup.dropped_tables(conn, watched)
        for oid in gone:
            name = self._stream_names.get(oid) or self._tables[oid].qualified
            self._dropped[oid] = (name, lsn)
            log.warning("table %s was dropped: delivering its changes up to %s, then stopping",
                        name, format_lsn(lsn))

    def _plain_connection(self) -> psycopg.Connection:
        if self._sql is None or self._sql.closed:
            self._sql = setup.connect(self.dsn)
        return self._sql

    # -- snapshots -----------------------------------------------------------------------------

    @property
    def _chunked_snapshots(self) -> bool:
        """Snapshots go in key chunks through the stream (see `backfill`) when the server
        sends logical messages (14+) and every table has a primary key; else the whole
        snapshot is read in the slot's exported snapshot at creation."""
        return self._server_version >= setup.MESSAGES_VERSION and all(
            table.key for table in self._tables.values())

    def _read_snapshot(self, snapshot_name: str) -> Iterator[Change | SnapshotState]:
        """Every row of the tables as of the slot's creation, as snapshot inserts; once the
        last is acknowledged, the snapshot is recorded as delivered (see `_settle`)."""
        ledger = self._ledger

        def make(item: snapshot.SnapshotItem, number: int, last: bool) -> Any:
            change = snapshot.exported_change(item, number)
            if last:
                ledger.snapshot_last = change.position
            return change

        with psycopg.connect(self.dsn, autocommit=True) as reader:
            rows = snapshot.exported_rows(reader, snapshot_name, list(self._tables.values()),
                                          self.snapshot_batch, markers=self.snapshot_markers)
            yield from self.snapshot_changes(rows, make)
        if ledger.snapshot_last is None:  # nothing to deliver: done already
            snapshot.mark(self.dsn, self.publication, self._meta, snapshot.DONE)

    def _plan_backfills(self, conn: psycopg.Connection) -> None:
        """Back-fill each table whose snapshot was not delivered on this slot yet, continuing
        after the last recorded chunk of one cut short."""
        planned = list(snapshot.backfill_states(self._meta, self._tables.values()))
        if planned:
            self._backfiller.states.update(self._meta.get("backfill") or {})
        for table, state in planned:
            name = self._stream_names.get(table.oid, table.qualified)
            self._backfiller.start(snapshot.table_backfill(conn, table, name, state))

    def _own_message(
        self, message: Message, decoder: PgOutputDecoder
    ) -> list[Change | SnapshotState]:
        """Handle changefeed's own messages: a watermark closing a back-fill chunk (its rows
        come out), a back-fill request."""
        if message.prefix == BACKFILL_PREFIX:
            self._backfill_requested(message.content)
            return []
        window = self._backfiller.watermark(message.content)
        if window is None:
            return []
        oid = window.backfill.oid
        relation = decoder.relations.get(oid)
        version = (relation.schema_version if relation is not None
                   else snapshot.schema_version_of(self._plain_connection(), oid))
        changes, last = snapshot.window_changes(
            window, self._stream_names.get(oid, window.backfill.table), version,
            decoder.next_position, markers=self.snapshot_markers,
        )
        self._backfiller.handed_out(last)
        return changes

    def _backfill_requested(self, content: bytes) -> None:
        for oid in snapshot.requested_tables(content, self.slot):
            table = self._tables.get(oid)
            if table is None or oid in self._dropped:
                continue
            if not table.key:
                log.warning("cannot back-fill %s: it has no primary key", table.qualified)
                continue
            log.info("back-fill of %s requested: reading it in chunks of %s rows",
                     table.qualified, f"{self.snapshot_batch:,}")
            name = self._stream_names.get(table.oid, table.qualified)
            self._backfiller.start(snapshot.table_backfill(self._plain_connection(), table,
                                                           name))

    def _settle(self) -> None:
        """Record what acknowledgements completed: back-fill chunks, the exported snapshot
        (I/O, so never from `on_acknowledge`)."""
        ledger = self._ledger
        if self._backfiller.finished:
            self._backfiller.confirmed(ledger.flush_lsn, ledger.replay_after)
        if ledger.snapshot_delivered():
            snapshot.mark(self.dsn, self.publication, self._meta, snapshot.DONE)

    # -- the stream ----------------------------------------------------------------------------

    def _stream(self, repl: psycopg.Connection) -> Iterator[Change | None]:
        pgconn = repl.pgconn
        # Messages are always asked for where the server has them (14+), wanted or not: they
        # carry the back-fills' watermarks and requests, and a transactional one takes an index
        # among its transaction's changes, so positions stay the same whichever prefixes a run
        # asks for.
        with_messages = self._server_version >= setup.MESSAGES_VERSION
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}{})"
        ).format(sql.Identifier(self.slot), sql.Literal(self.publication),
                 sql.SQL(", messages 'true'" if with_messages else ""))
        pgconn.send_query(command.as_bytes(repl))
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = text(result.error_message if result else b"") or text(
                pgconn.get_error_message()
            )
            code = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            raise start_replication_error(self.slot, text(code), message)
        ledger = self._ledger
        ledger.restart()
        self._backlog.clear()
        self._backlog_bytes = 0
        self._streaming = pgconn
        start = slots.confirmed_position(self._sql, self.slot) if self._sql else None
        log.info(
            "streaming %s from slot %s at %s (publication %s)",
            ", ".join(t.qualified for t in self._tables.values()), self.slot, start or "?",
            self.publication,
        )

        decoder = PgOutputDecoder(
            self.operation,
            # User types (domains, enums, composites, ranges) are looked up on a plain
            # connection, opened only when a Relation names one not seen yet.
            loaders=psycopg_loaders(repl, catalog=lambda: setup.connect(self.dsn)),
            tables=self._stream_names,
            primary_keys={oid: table.key for oid, table in self._tables.items()},
            messages=(*self.messages, *_OWN_PREFIXES) if with_messages else (),
        )
        decode = decoder.decode
        skip_until = ledger.replay_after
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
                if nbytes > 0 and buffer[0] == XLOGDATA:
                    self._backlog_bytes -= nbytes
            else:
                nbytes, buffer = get_copy_data(1)
            if nbytes > 0:
                if buffer[0] == XLOGDATA:
                    event = decode(buffer[XLOGDATA_HEADER_SIZE:])
                    if event is None:
                        continue
                    if event.__class__ is Change:
                        last_emitted = event.position
                        if observe is not None:
                            observe(event)
                        if skip_until is None or last_emitted > skip_until:
                            yield event
                    elif event.__class__ is Begin:
                        ledger.begin()
                        last_emitted = None
                    elif event.__class__ is Commit:
                        ledger.commit(last_emitted, event.end_lsn)
                        stats.lag_bytes = max(0, xlogdata_header(buffer)[1] - event.end_lsn)
                        if backfiller.finished:
                            backfiller.committed(event.end_lsn)
                        self._settle()
                        if backfiller.due:
                            backfiller.open_chunk()
                            observe = backfiller.observe if backfiller.queue else None
                    elif event.__class__ is Message:
                        if event.prefix.startswith(_OWN_PREFIXES):  # watermarks, requests
                            for change in self._own_message(event, decoder):
                                last_emitted = change.position
                                yield change
                            observe = backfiller.observe if backfiller.queue else None
                            continue
                        if ledger.in_transaction:
                            last_emitted = event.position
                        else:
                            ledger.standalone_message(event.position, event.lsn)
                        if skip_until is None or event.position > skip_until:
                            yield event
                    elif event.__class__ is Truncate:
                        log.warning("TRUNCATE of %s is not emitted as changes",
                                    ", ".join(event.tables))
                    elif event.__class__ is Renamed:
                        log.warning("table %s is now %s: its changes go on under the new name",
                                    event.old_name, event.new_name)
                        self._stream_names[event.oid] = event.new_name
                elif buffer[0] == KEEPALIVE:
                    wal_end, _, reply_requested = keepalive(buffer)
                    stats.lag_bytes = max(0, wal_end - ledger.received_lsn)
                    ledger.keepalive(wal_end)
                    if reply_requested:
                        self._send_status(pgconn)
                continue
            if nbytes < 0:
                raise self._stream_ended(pgconn, nbytes)
            yield None  # caught up: the consumer may flush and acknowledge now
            if backlog:
                continue
            self._settle()
            now = time.monotonic()
            if now - last_table_check >= DROP_CHECK_SECONDS and self._sql is not None:
                last_table_check = now
                self._note_dropped_tables(self._sql)
            if self._dropped:
                self._end_if_dropped_tables_delivered(pgconn)
            if backfiller.due:
                backfiller.open_chunk()
                observe = backfiller.observe if backfiller.queue else None
            if now - self._last_status >= self.status_interval or ledger.flush_due:
                self._send_status(pgconn)
            readable, _, _ = select.select([sock], [], [], 1.0)
            if not readable:
                yield None
            pgconn.consume_input()

    def _end_if_dropped_tables_delivered(self, pgconn: pq.abc.PGconn) -> None:
        """End the feed once everything up to the drop of a watched table is acknowledged."""
        until = max(lsn for _, lsn in self._dropped.values())
        if self._ledger.delivered_through(until):
            self._send_status(pgconn)
            names = ", ".join(sorted(name for name, _ in self._dropped.values()))
            raise PermanentBackendError(
                f"table {names} was dropped: every change before the drop was delivered;"
                f" drop the feed's slot (changefeed slots --drop {self.slot}) if it is not"
                " needed any more"
            )
        self._send_status(pgconn, reply=True)  # the reply tells how far the server's WAL goes

    def _stream_ended(self, pgconn: pq.abc.PGconn, nbytes: int) -> Exception:
        message = text(pgconn.get_error_message())
        if nbytes == -1:
            result = pgconn.get_result()
            if result is not None and result.error_message:
                message = text(result.error_message)
        return stream_ended(message)

    # -- while the consumer is busy ------------------------------------------------------------

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
                if buffer[0] == XLOGDATA:
                    self._backlog_bytes += nbytes
                    self._ledger.received(xlogdata_header(buffer)[0])
                elif buffer[0] == KEEPALIVE:  # the stream loop sees it again later
                    wal_end, _, reply_requested = keepalive(buffer)
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
        ledger = self._ledger
        if ledger.undelivered(backlog=self._backlog_bytes > 0):
            self._send_status(pgconn, written=max(ledger.received_lsn, wal_end), flush=0)
        else:
            ledger.keepalive(wal_end)
            self._send_status(pgconn)

    # -- acknowledgement -----------------------------------------------------------------------

    def on_acknowledge(self, position: Any) -> None:
        """Note ``position`` in the ledger; the stream loop, keep_alive() or close() tell the
        server."""
        self._ledger.acknowledge(position)

    def _send_status(
        self, pgconn: pq.abc.PGconn, *, written: int | None = None, flush: int | None = None,
        reply: bool = False,
    ) -> None:
        """Send a standby status update: received up to ``written``, delivered up to ``flush``
        (default: what the ledger says; 0 tells the server nothing about delivery); ``reply``
        asks the server for a keepalive telling how far its WAL goes."""
        ledger = self._ledger
        if flush is None:
            flush = ledger.flush_lsn
        if written is None:
            written = max(ledger.received_lsn, flush)
        message = standby_status(written, flush, unix_time=time.time(), reply=reply)
        if pgconn.put_copy_data(message) != 1 or pgconn.flush() != 0:
            raise psycopg.OperationalError(
                text(pgconn.get_error_message()) or "could not send the standby status"
            )
        self._last_status = time.monotonic()
        ledger.reported(flush)

    def close(self) -> None:
        """Tell the server what was delivered, and release the connections.

        An acknowledgement that came after the stream closed is recorded on the slot directly:
        a consumer that stops (``--limit``, a signal, an idle timeout) leaves `changes()`,
        which closes the stream, before it flushes and acknowledges its last output, then
        closes the feed; without this the next run would repeat those changes.
        """
        self._settle()
        ledger = self._ledger
        repl = self._replication
        if repl is not None:
            if not repl.closed:
                if repl.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
                    try:  # tell the server what was delivered before going away
                        self._send_status(repl.pgconn)
                    except psycopg.Error:
                        pass
                repl.close()
            self._flush_at_stream_close = ledger.flush_lsn
        elif ledger.flush_lsn > max(self._flush_at_stream_close, ledger.reported_lsn):
            slots.advance_slot(self.dsn, self.slot, format_lsn(ledger.flush_lsn))
            ledger.reported(ledger.flush_lsn)  # tried: the warning said what comes again
        self._replication = None
        self._streaming = None
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._sql is not None and not self._sql.closed:
            self._sql.close()
        self._sql = None

    # -- errors --------------------------------------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        """Connection-level failures (lost connection, server shutdown, terminated walsender);
        see `errors.is_transient`."""
        return is_transient(exc)

    def __repr__(self) -> str:
        return f"PostgresChangeFeed({self.table!r}, {self.operation!r}, slot={self.slot!r})"


register_backend(
    "postgres", PostgresChangeFeed, connection_types=[psycopg.Connection],
    check_url=check_postgresql_dsn,
)
