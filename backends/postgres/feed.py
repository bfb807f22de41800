"""The PostgreSQL feed: logical replication over psycopg 3's streaming protocol, pgoutput.

One feed = one replication slot + one publication (``changefeed_<name>`` by default, created on
first run, reused after); the publication publishes only the selected operations.
`PostgresChangeFeed.run_changefeed()` prepares the server, takes the snapshot prefeed, then
runs the stream loop (`streaming`), which decodes and dispatches the frames the `stream` reads
and answers the application's DDL (`ddl`); the `ledger` says what the slot may confirm
(ARCHITECTURE.md, "Acknowledgement"), `errors` what a failure means."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from changefeed._speedups import LINE_FORMATS, kernels
from changefeed.backends.postgres import catalog, slots, snapshot
from changefeed.backends.postgres.backfill import (
    DEFAULT_CHUNK_ROWS,
    Backfills,
    in_chunks,
    save_progress,
)
from changefeed.backends.postgres.connection import (
    check_messages,
    check_server,
    connect,
    connect_replication,
    conninfo,
)
from changefeed.backends.postgres.ddl import StructureReactions
from changefeed.backends.postgres.errors import is_transient
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.names import (
    check_publication_name,
    check_slot_name,
    default_slot_name,
    legacy_slot_name,
    parse_table_name,
    slot_name_for,
    split_tables,
)
from changefeed.backends.postgres.pgoutput import PgOutputDecoder
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.protocol import format_lsn
from changefeed.backends.postgres.publication import choose_names, ensure_publication
from changefeed.backends.postgres.stream import ReplicationStream
from changefeed.backends.postgres.streaming import IdleCheck, StreamLoop
from changefeed.backends.postgres.structure import Structure
from changefeed.backends.postgres.tables import WatchedTables
from changefeed.bounds import seconds_problem
from changefeed.change import ALL, ROW_OPERATIONS, Change, SnapshotState
from changefeed.errors import ConfigurationError
from changefeed.feed import ChangeFeed
from changefeed.preflight import check_postgresql_dsn
from changefeed.registry import register_backend


class PostgresChangeFeed(StreamLoop, StructureReactions, ChangeFeed):
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
        chunk_size: rows per snapshot chunk at most (fewer when they would hold more than 16 MB;
            see `changefeed.backends.postgres.chunks`); an
            exported snapshot fetches this many at a time (``--chunk-size``).
        exclude: tables or patterns to leave out of ``table``'s.
        snapshot_markers: also yield a `SnapshotState` where each table's snapshot starts and
            where it is done.
        messages: prefixes of the ``pg_logical_emit_message`` messages to stream as `Message`
            objects among the changes (a prefix matches by ``startswith``; "" matches all).
            Needs PostgreSQL 14 or later.
        slot_wait: seconds the first connection waits for a slot that another process streams
            from to be released (a client that just died holds it until the server notices),
            before it fails; 0 fails at once.
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
        chunk_size: int = DEFAULT_CHUNK_ROWS,
        exclude: str | Sequence[str] = (),
        snapshot_markers: bool = False,
        messages: Sequence[str] = (),
        slot_wait: float = slots.RELEASE_WAIT,
        **options: Any,
    ) -> None:
        tables = split_tables(table)
        if not tables:
            raise ConfigurationError("no table given")
        super().__init__(",".join(tables), operation, connection=connection, **options)
        self._ledger = AckLedger()
        self._ledger.acknowledge(self._acknowledged_position)  # the checkpoint's, as text
        self.tables = tables
        self.table_names = [parse_table_name(name) for name in tables]
        self.exclude = [parse_table_name(name) for name in split_tables(exclude)]
        self.snapshot_markers = snapshot_markers
        self.dsn = conninfo(connection)
        self._default_names = slot is None and publication is None
        if slot is None:
            name = options.get("name")
            slot = slot_name_for(name) if name else default_slot_name(self.table_names)
        self.slot = check_slot_name(slot)
        self.publication = check_publication_name(publication or self.slot)
        self.status_interval = status_interval
        problem = seconds_problem(slot_wait, open_minimum=False)
        if problem is not None:
            raise ConfigurationError(f"slot_wait={slot_wait!r}: {problem}")
        self.slot_wait = slot_wait
        """Seconds the first connection waits for a slot another process streams from."""
        self.chunk_size = chunk_size
        self.messages = tuple([messages] if isinstance(messages, str) else messages)
        self._tables = WatchedTables()
        self._slot_known = False  # the slot existed (or was made) on an earlier connection
        self._meta: dict[str, Any] = {}  # the publication's record (see `catalog`)
        self._server_version = 0
        self._backfills = Backfills(
            self.slot, self._tables, self._plain_connection, chunk_size=chunk_size,
            markers=snapshot_markers, save=lambda states: save_progress(
                self._plain_connection, self.publication, self._meta, states),
            ledger=self._ledger,
        )
        self._sql: psycopg.Connection | None = None
        self._replication: psycopg.Connection | None = None
        self._stream: ReplicationStream | None = None  # while START_REPLICATION runs
        self._line_format: tuple[str, Any, Any] | None = None  # see `prefer_lines`
        self._idle = IdleCheck()
        self._structure = Structure(self._tables, self.table_names, self.exclude, self.operation)
        self._decoder: PgOutputDecoder | None = None
        self._renames: dict[int, tuple[str, int]] = {}
        """Renames the catalog showed and the stream did not: OID -> (new name, the WAL
        position from which changes take it)."""

    # -- setup ---------------------------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        # The order matters, so that a mistake ends with one clear line before anything is
        # changed: connect, the server, the tables, the names, the replication connection,
        # the slot's state, and last the publication, the only step that writes.
        first_connection = not self.connected_once
        conn = self._sql = connect(self.dsn)
        self._settle()  # acknowledgements that came after the last stream closed
        self._server_version = check_server(conn)
        self._tables.check(conn, self.table_names, self.exclude)
        if first_connection:
            self._leave_out_refused(conn)
        check_messages(conn, self.messages)
        if first_connection:
            if self._default_names:
                names = choose_names(conn, self.slot, list(self._tables.by_oid.values()),
                                     legacy_slot_name(self.tables))
                if names is not None:
                    self.slot, self.publication = names
            self._backfills.slot = self.slot
        repl = self._replication = connect_replication(self.dsn, conn)
        slot = slots.get_slot(conn, self.slot)
        waited = 0.0
        if first_connection and slot is not None and slot.active and self.slot_wait > 0:
            # Most likely a client that just died, whose walsender has not noticed yet.
            began = time.monotonic()
            slot = slots.wait_until_released(conn, slot, self.slot_wait, lambda: self.stopping)
            waited = time.monotonic() - began
            if self.stopping:  # asked to stop while it waited: nothing was read, nothing lost
                return
        slots.check_slot(conn, slot, first_connection=first_connection, waited=waited)
        publication = ensure_publication(
            conn, self.publication, self._tables.live(), slot=self.slot,
            operation=self.operation & ROW_OPERATIONS, default_names=self._default_names,
            backfill_added=self.prefeed == "snapshot",
        )
        self._meta = publication.meta
        self.mark_connected()

        pending = self.prefeed == "snapshot" and self._meta.get("snapshot") == snapshot.PENDING
        slot = slots.slot_to_continue(conn, self.slot, slot, snapshot_pending=pending,
                                      known=self._slot_known)
        chunked = in_chunks(self._server_version, self._tables.by_oid.values())
        if slot is None:
            exported = self.prefeed == "snapshot" and not chunked
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
        if first_connection:
            self._start_structure(conn, chunked)
        yield from self._stream_changes(repl)

    def _plain_connection(self) -> psycopg.Connection:
        if self._sql is None or self._sql.closed:
            self._sql = connect(self.dsn)
        return self._sql

    # -- snapshots -----------------------------------------------------------------------------

    def _read_snapshot(self, snapshot_name: str) -> Iterator[Change | SnapshotState]:
        """Every row of the tables as of the slot's creation, as snapshot inserts; once the
        last is acknowledged, the snapshot is recorded as delivered (see `_settle`)."""
        self._ledger.snapshot_last = None  # of a snapshot taken before and cut short
        with connect(self.dsn) as reader:
            tables = list(self._tables.by_oid.values())
            rows = snapshot.exported_rows(reader, snapshot_name, tables, self.chunk_size,
                                          markers=self.snapshot_markers)
            yield from self.snapshot_changes(rows, snapshot.ExportedChanges(self._ledger))
        if self._ledger.snapshot_last is None:  # nothing to deliver: done already
            snapshot.mark(self.dsn, self.publication, self._meta, snapshot.DONE)

    def _settle(self) -> None:
        """Record what acknowledgements completed: back-fill chunks, the exported snapshot
        (I/O, so never from `on_acknowledge`)."""
        ledger = self._ledger
        if self._backfills.finished or ledger.held is not None:
            self._backfills.confirmed(ledger)
        # Called twice per live transaction: the attribute first, cheaper than the call.
        if ledger.snapshot_last is not None and ledger.snapshot_delivered():
            snapshot.mark(self.dsn, self.publication, self._meta, snapshot.DONE)

    # -- the stream (the loop: `streaming`; the reactions to DDL: `ddl`) ------------------------

    def source_caught_up(self) -> bool:
        """Whether the stream has read the server's WAL as far as it went when the feed went
        quiet, with nothing undelivered, no back-fill under way: idle means caught up, not a
        slot far behind or a large transaction still being decoded."""
        stream = self._stream
        if not self._idle.wanted:  # the first to ask: the stream loop checks from now on
            self._idle.wanted = True
            if stream is not None and stream.caught_up:  # and the first check starts now,
                # not after the loop's next wait for the socket (up to a second when quiet)
                try:
                    self._idle.quiet(stream, self._sql, self.stats.changes, time.monotonic())
                except psycopg.Error:  # outside the loop's reconnects: not caught up, and
                    return False  # the loop meets the same failure and deals with it
        return (stream is not None and stream.caught_up and not self._ledger.in_transaction
                and not self._backfills.busy
                and self._idle.reached(stream, self.stats.changes))

    # -- what the consumer drives --------------------------------------------------------------

    def prefer_lines(self, fmt: str, model: Any = None, where: list[Any] | None = None) -> bool:
        """Hand out row changes as batches of their ``fmt`` lines where the compiled path is
        built (see `ChangeFeed.prefer_lines`): decoded, filtered and written in C straight
        from the stream's bytes, many to a Python call. A back-fill in progress still gets
        `Change` objects (and so does the reader, then)."""
        if kernels is None or fmt not in LINE_FORMATS:
            return False
        self._line_format = (fmt, model, where)
        self._backfills.line_format = (fmt, model) if where is None else None
        return True

    def keep_alive(self) -> None:
        """Answer the walsender while the consumer is busy (see `ReplicationStream.read_ahead`):
        what it reads waits in a backlog the stream loop takes first."""
        if self._stream is not None:
            self._stream.read_ahead()

    def wait_for_source(self, timeout: float | None, fd: int) -> bool | None:
        """Wait until the replication stream has more or ``fd`` is readable (see
        `ChangeFeed.wait_for_source`); None while no stream is open (reconnecting)."""
        stream = self._stream
        if stream is None or not stream.usable or self._replication is None:
            return None
        if self._backfills.due:  # the next chunk of a back-fill is the loop's to read now
            return True
        return stream.wait_either(timeout, fd)

    @property
    def acknowledged(self) -> PgPosition | None:
        """The last position acknowledged (loaded from the checkpoint at start), as the ledger
        keeps it: the one record of it (see `AckLedger`)."""
        return self._ledger.acknowledged

    def on_acknowledge(self, position: Any) -> None:
        """Note ``position`` in the ledger; the stream loop, keep_alive() or close() tell the
        server."""
        self._ledger.acknowledge(position)

    def close(self) -> None:
        """Tell the server what was delivered, and release the connections.

        An acknowledgement that came after the stream closed is recorded on the slot directly:
        a consumer may acknowledge after `changes()` ended by itself (an idle timeout, a stop
        seen inside it, the feed's own end) and then close the feed; without this the next run
        would repeat those changes. (`changefeed.delivery.deliver` acknowledges before it
        closes the stream whenever it ends the loop itself.)
        """
        self._settle()
        ledger = self._ledger
        repl = self._replication
        if repl is not None:
            if self._stream is not None:
                self._stream.finish()
            repl.close()
            ledger.stream_closed()
        elif ledger.acknowledged_after_close:
            slots.advance_slot(self.dsn, self.slot, format_lsn(ledger.confirmable_lsn))
            ledger.reported(ledger.confirmable_lsn)  # tried: the warning said what comes again
        self._replication = None
        self._stream = None
        if self._sql is not None and not self._sql.closed:
            self._sql.close()
        self._sql = None

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
