"""The PostgreSQL feed: logical replication over psycopg 3's streaming protocol, pgoutput.

One feed = one replication slot + one publication (``changefeed_<name>`` by default, created on
first run, reused after); the publication publishes only the selected operations.
`PostgresChangeFeed.run_changefeed()` prepares the server, takes the snapshot prefeed, then
decodes and dispatches the frames the `stream` reads; the `ledger` says what the slot may
confirm (ARCHITECTURE.md, "Acknowledgement"), `errors` what a failure means."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg

from changefeed._speedups import LINE_FORMATS, Lines, kernels
from changefeed.backends.postgres import catalog, slots, snapshot
from changefeed.backends.postgres.backfill import Backfills, in_chunks, save_progress
from changefeed.backends.postgres.chunks import BACKFILL_PREFIX, WATERMARK_PREFIX
from changefeed.backends.postgres.connection import (
    MESSAGES_VERSION,
    check_messages,
    check_server,
    connect,
    connect_replication,
    conninfo,
)
from changefeed.backends.postgres.errors import is_transient
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.loading import psycopg_loaders
from changefeed.backends.postgres.names import (
    check_publication_name,
    check_slot_name,
    default_slot_name,
    legacy_slot_name,
    parse_table_name,
    slot_name_for,
    split_tables,
)
from changefeed.backends.postgres.pgoutput import (
    Begin,
    Commit,
    PgOutputDecoder,
    Renamed,
    Truncated,
)
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.protocol import format_lsn
from changefeed.backends.postgres.publication import (
    add_tables,
    choose_names,
    ensure_publication,
    refusal,
)
from changefeed.backends.postgres.stream import ReplicationStream
from changefeed.backends.postgres.structure import CHECK_SECONDS, Structure
from changefeed.backends.postgres.tables import Table, WatchedTables, tables_by_oid
from changefeed.change import ALL, ROW_OPERATIONS, Change, Operation, SnapshotState
from changefeed.errors import ConfigurationError
from changefeed.feed import ChangeFeed
from changefeed.message import Message
from changefeed.preflight import check_postgresql_dsn
from changefeed.registry import register_backend

log = logging.getLogger("changefeed.postgres")

_OWN_PREFIXES = (WATERMARK_PREFIX, BACKFILL_PREFIX)
"""Messages changefeed writes for itself (see `chunks`): handled, never handed out."""


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
        chunk_size: rows per snapshot chunk (see `changefeed.backends.postgres.chunks`); an
            exported snapshot fetches this many at a time (``--chunk-size``).
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
        chunk_size: int = 5000,
        exclude: str | Sequence[str] = (),
        snapshot_markers: bool = False,
        messages: Sequence[str] = (),
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
        slots.check_slot(conn, slot, first_connection=first_connection)
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

    def _leave_out_refused(self, conn: psycopg.Connection) -> None:
        """Tables a pattern matched that could not be published (their UPDATE/DELETE would
        fail) are left out, said once, rather than refusing the feed (a named one is
        refused: `ensure_publication`)."""
        for table in [t for t in self._tables.by_oid.values() if t.from_pattern]:
            why = refusal(conn, table, self.operation)
            if why is not None:
                del self._tables.by_oid[table.oid]
                self._tables.stream_names.pop(table.oid, None)
                self._structure.say_once(("refused", table.qualified), "%s matches %s but is"
                                         " not streamed: %s", table.qualified,
                                         ", ".join(self.tables), why)
        if not self._tables.by_oid:
            raise ConfigurationError(
                f"no table of {', '.join(self.tables)} can be streamed (see above)")

    def _start_structure(self, conn: psycopg.Connection, chunked: bool) -> None:
        """At the feed's start: the back-fills to go on with or begin (a snapshot, tables a
        pattern matched since, partitions attached since), and what the operations miss."""
        attached = self._structure.start(conn, self._meta)
        if chunked:
            self._backfills.plan(conn, self._meta, pending_only=self.prefeed != "snapshot")
            for root, partition in attached:
                self._backfill_partition(root, partition)
        catalog.write_meta(conn, self.publication, self._meta)
        moves = self.operation & Operation.UPDATE and not (
            self.operation & Operation.INSERT and self.operation & Operation.DELETE)
        partitioned = [t.qualified for t in self._tables.live() if t.kind == "p"]
        if moves and partitioned:
            log.warning(
                "an UPDATE that moves a row of %s to another partition is a delete and an"
                " insert there, which --ops %s does not deliver: add insert,delete to see it",
                ", ".join(partitioned), ",".join(self.operation.names))

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
        if self._backfills.finished:
            self._backfills.confirmed(ledger)
        if ledger.snapshot_delivered():
            snapshot.mark(self.dsn, self.publication, self._meta, snapshot.DONE)

    # -- the stream ----------------------------------------------------------------------------

    def _stream_changes(self, repl: psycopg.Connection) -> Iterator[Change | None]:
        # Messages are always asked for where the server has them (14+), wanted or not: they
        # carry the back-fills' watermarks and requests, and a transactional one takes an index
        # among its transaction's changes, so positions stay the same whichever prefixes a run
        # asks for.
        with_messages = self._server_version >= MESSAGES_VERSION
        ledger = self._ledger
        stream = self._stream = ReplicationStream.start(
            repl, self.slot, self.publication, messages=with_messages, ledger=ledger,
            status_interval=self.status_interval, stats=self.stats,
        )
        start = slots.confirmed_position(self._sql, self.slot) if self._sql else None
        log.info("streaming %s from slot %s at %s (publication %s)",
                 ", ".join(t.qualified for t in self._tables.by_oid.values()), self.slot,
                 start or "?", self.publication)
        decoder = PgOutputDecoder(
            self.operation,
            # User types (domains, enums, composites, ranges) are looked up on a plain
            # connection, opened only when a Relation names one not seen yet.
            loaders=psycopg_loaders(repl, catalog=lambda: connect(self.dsn)),
            tables=self._tables.stream_names,
            primary_keys={oid: table.key for oid, table in self._tables.by_oid.items()},
            messages=(*self.messages, *_OWN_PREFIXES) if with_messages else (),
        )
        self._decoder = decoder
        decode_changes = decoder.decode
        skip_until = ledger.replay_after
        # The direct path (`prefer_lines`): row changes as batches of output lines, decoded
        # and written in C; `Change` objects still while a back-fill needs to see them.
        decode_lines = None
        if self._line_format is not None:
            fmt, model, where = self._line_format
            decode_lines = decoder.line_decoder(
                fmt, model, frames=stream.frames, replay_after=skip_until, where=where)

        def decoding(observe: Any) -> Callable[[Any], Any]:
            return decode_changes if observe is not None or decode_lines is None else decode_lines

        last_emitted: PgPosition | None = None
        last_table_check = time.monotonic()
        backfills = self._backfills
        backfills.reset()  # a window of the previous connection is lost: its chunk comes again
        # While tables are back-filled, their changes go to the back-fills too (see `backfill`).
        observe = backfills.observer
        decode = decoding(observe)

        # The hot loop: one iteration per pgoutput message, hundreds of thousands a second.
        try:
            for payload in stream.frames:
                if payload is not None:
                    event = decode(payload)
                    if event is None:
                        continue
                    if event.__class__ is Change:
                        last_emitted = event.position
                        if observe is not None:
                            observe(event)
                        if skip_until is None or last_emitted > skip_until:
                            yield event
                    elif event.__class__ is Lines:  # delivered ones left out already
                        last_emitted = event.seen
                        if event.count:
                            yield event
                    elif event.__class__ is Begin:
                        ledger.begin()
                        last_emitted = None
                    elif event.__class__ is Commit:
                        stream.committed(last_emitted, event.end_lsn)
                        if backfills.finished:
                            backfills.committed(event.end_lsn)
                        self._settle()
                        if backfills.due:
                            backfills.open_chunk()
                            observe = backfills.observer
                            decode = decoding(observe)
                    elif event.__class__ is Message:
                        if event.prefix.startswith(_OWN_PREFIXES):  # watermarks, requests
                            for change in backfills.on_message(event, decoder):
                                last_emitted = change.position
                                yield change
                            observe = backfills.observer
                            decode = decoding(observe)
                            continue
                        if ledger.in_transaction:
                            last_emitted = event.position
                        else:
                            ledger.standalone_message(event.position, event.lsn)
                        if skip_until is None or event.position > skip_until:
                            yield event
                    elif event.__class__ is Truncated:
                        if not event.items and not self.operation & Operation.TRUNCATE:
                            log.warning("TRUNCATE of %s is not emitted (the operations asked for"
                                        " leave truncate out): consumers keep the rows",
                                        ", ".join(event.tables))
                        for item in event.items:
                            last_emitted = item.position
                            if observe is not None:
                                observe(item)
                            if skip_until is None or last_emitted > skip_until:
                                yield item
                    elif event.__class__ is Renamed:
                        self._renamed(event.oid, event.old_name, event.new_name)
                    continue
                yield None  # caught up: the consumer may flush and acknowledge now
                if not stream.caught_up:  # the consumer's keep_alive() read on meanwhile
                    continue
                self._settle()
                now = time.monotonic()
                if now - last_table_check >= CHECK_SECONDS and self._sql is not None:
                    last_table_check = now
                    self._watch_structure(self._sql)
                if self._renames:
                    self._apply_renames(stream.wal_end)
                if self._tables.dropped:
                    self._end_if_dropped_tables_delivered(stream)
                if backfills.due:
                    backfills.open_chunk()
                    observe = backfills.observer
                    decode = decoding(observe)
                if stream.status_due(now):
                    stream.send_status()
                self._idle.quiet(stream, self._sql, self.stats.changes, now)
                if not stream.wait(1.0):
                    yield None
            raise stream.ended()
        except GeneratorExit:  # the consumer stopped, maybe right after a transaction's last change
            if ledger.in_transaction and last_emitted is not None:
                end_lsn = stream.read_to_commit(decode_changes, last_emitted)
                if end_lsn is not None and backfills.finished:
                    backfills.committed(end_lsn)
            raise

    # -- what the application's DDL does (see `structure`) --------------------------------------

    def _watch_structure(self, conn: psycopg.Connection) -> None:
        self._tables.note_dropped(conn)
        found = self._structure.check(conn)
        chunked = in_chunks(self._server_version, ())
        for root, partition in found.attached:
            if chunked:
                self._backfill_partition(root, partition)
            else:
                self._structure.say_once(
                    ("attached", partition), "a partition of %s appeared: its rows from before"
                    " are not delivered (chunked back-fills need PostgreSQL 14)",
                    self._tables.name_of(root))
        if found.appeared:
            self._add_tables(conn, found.appeared, chunked)
        for oid, _, new in found.renamed:
            self._renames.setdefault(oid, (new, found.position))
        if found.attached or found.appeared:
            catalog.write_meta(conn, self.publication, self._meta)

    def _backfill_partition(self, root: int, partition: int) -> None:
        self._meta["partitions"] = self._structure.record()
        self._backfills.start_table(
            root, source=partition, markers=False,
            why=f"a partition of {self._tables.name_of(root)} appeared (created or attached)"
                f" with rows it may hold from before: back-filling it")

    def _add_tables(self, conn: psycopg.Connection, tables: list[Table], chunked: bool) -> None:
        """Tables a pattern matches that appeared: streamed from now on and back-filled."""
        own = self._meta.get("slot") == self.slot
        if not own or not chunked:
            for table in tables:
                self._structure.say_once(
                    ("appeared", table.oid), "%s matches %s but is streamed from the next run"
                    " on (%s)", table.qualified, ", ".join(self.tables),
                    "the publication is not this feed's own" if not own
                    else "chunked back-fills need PostgreSQL 14")
            return
        added, refused = add_tables(conn, self.publication, tables, self._meta,
                                    self.operation)
        for name, why in refused.items():
            self._structure.say_once(("refused", name), "%s matches %s but is not streamed:"
                                     " %s", name, ", ".join(self.tables), why)
        decoder = self._decoder
        for table in added:
            self._tables.add(table)
            if decoder is not None and decoder.table_names is not None:
                decoder.table_names[table.oid] = table.qualified
                decoder.primary_keys[table.oid] = table.key
            log.warning("%s appeared (it matches %s): streaming it, and back-filling its rows",
                        table.qualified, ", ".join(self.tables))
            self._backfills.start_table(table.oid)
        if added:
            self._meta["partitions"] = self._structure.record()

    def _renamed(self, oid: int, old: str, new: str, *, late: bool = False) -> None:
        """Table ``oid`` is ``new`` from here on in the stream: its changes carry that name;
        with a snapshot prefeed its rows are read again under it. ``late``: the catalog said
        so, not the stream (a schema renamed), so changes since the rename had the old name."""
        self._renames.pop(oid, None)
        self._tables.stream_names[oid] = new
        decoder = self._decoder
        if decoder is not None and decoder.table_names is not None:
            decoder.table_names[oid] = new
        self._backfills.renamed(oid, new)
        # Not while a restarted stream replays changes from before a rename (their Relation
        # says the name they had): only under the name the table has now.
        again = (self.prefeed == "snapshot" and in_chunks(self._server_version, ())
                 and self._sql is not None and _current_name(self._sql, oid) == new)
        log.warning("table %s is now %s: its changes go on under the new name%s%s", old, new,
                    " (those committed since the rename until now carry the old one: the"
                    " stream does not say when a schema is renamed)" if late else "",
                    ", and its rows are read again under it (a consumer holding rows under"
                    f" {old} must drop them)" if again else "")
        if again:
            self._backfills.start_table(oid)

    def _apply_renames(self, read_up_to: int) -> None:
        """Renames the catalog showed, once the stream has read as far as the WAL went then
        (a Relation message with the new name would have come first)."""
        for oid, (new, position) in list(self._renames.items()):
            if read_up_to >= position:
                self._renamed(oid, self._tables.name_of(oid), new, late=True)

    def _end_if_dropped_tables_delivered(self, stream: ReplicationStream) -> None:
        """End the feed once everything up to the drop of a watched table is acknowledged."""
        if self._ledger.delivered_through(self._tables.dropped_until):
            stream.send_status()
            raise self._tables.dropped_error(self.slot)
        stream.send_status(reply=True)  # the reply tells how far the server's WAL goes

    def source_caught_up(self) -> bool:
        """Whether the stream has read the server's WAL as far as it went when the feed went
        quiet, with nothing undelivered, no back-fill under way: idle means caught up, not a
        slot far behind or a large transaction still being decoded."""
        stream = self._stream
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
            slots.advance_slot(self.dsn, self.slot, format_lsn(ledger.flush_lsn))
            ledger.reported(ledger.flush_lsn)  # tried: the warning said what comes again
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


def _current_name(conn: psycopg.Connection, oid: int) -> str | None:
    table = tables_by_oid(conn, [oid]).get(oid)
    return table.qualified if table is not None else None


class IdleCheck:
    """Whether a quiet stream is caught up with the server: the server's WAL position is noted
    when the stream goes quiet (again at most every `SAMPLE_SECONDS` while changes come), and
    the walsender asked how far it has read; caught up once its keepalive passes that
    position with no change handed out since."""

    SAMPLE_SECONDS = 0.2
    ASK_SECONDS = 1.0

    def __init__(self) -> None:
        self.target: int | None = None
        self.changes = -1  # the feed's change count when the target was noted
        self.sampled = self.asked = 0.0

    def quiet(self, stream: ReplicationStream, conn: psycopg.Connection | None, changes: int,
              now: float) -> None:
        """The stream has nothing at hand: note the server's WAL position if changes came
        since, or ask the walsender again how far it has read."""
        if conn is None or conn.closed:
            return
        if changes != self.changes and now - self.sampled >= self.SAMPLE_SECONDS:
            self.target = slots.server_wal_position(conn)
            self.changes, self.sampled = changes, now
            self.asked = 0.0
        if (self.target is not None and stream.wal_end < self.target
                and now - self.asked >= self.ASK_SECONDS):
            stream.send_status(reply=True)  # its keepalive says how far it has read
            self.asked = now

    def reached(self, stream: ReplicationStream, changes: int) -> bool:
        return self.target is not None and changes == self.changes and (
            stream.wal_end >= self.target)


register_backend(
    "postgres", PostgresChangeFeed, connection_types=[psycopg.Connection],
    check_url=check_postgresql_dsn,
)
