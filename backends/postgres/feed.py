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

from changefeed.backends.postgres.pgoutput import (
    Begin,
    Commit,
    PgOutputDecoder,
    Truncate,
    format_lsn,
    make_position,
    psycopg_loaders,
)
from changefeed.change import ALL, Change, Operation
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    TransientBackendError,
    first_line,
)
from changefeed.feed import ChangeFeed, get_changefeed

log = logging.getLogger("changefeed.postgres")

_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!QqB")
_STANDBY_STATUS = struct.Struct("!cQQQqB")
PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds

_UTC = "SET TimeZone TO 'UTC'"
"""Sessions that read rows use UTC: timestamptz values then become datetimes in UTC whatever the
server's TimeZone (and psycopg loads them twice as fast as in a named zone)."""

SLOT_PREFIX = "changefeed_"
_SNAPSHOT_PENDING = "changefeed: snapshot pending"
_SNAPSHOT_DONE = "changefeed: snapshot done"


def slot_name_for(name: str) -> str:
    """The default slot (and publication) name of a feed: ``changefeed_`` + a safe form of it."""
    safe = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "feed"
    return (SLOT_PREFIX + safe)[:63]


class PostgresChangeFeed(ChangeFeed):
    """Changes of one or more PostgreSQL tables, through logical replication (pgoutput).

    Args:
        table: a table name (``tasks``, ``app.tasks``), a comma-separated list, or a list.
        operation: the operations to emit (`Operation` flags).
        prefeed: an iterable replayed first, or ``"snapshot"``: on the first run (when the slot
            is created) every row of the tables as a snapshot insert, then the stream from the
            exact point of that snapshot.
        connection: a libpq URL or conninfo string, or a psycopg connection to take it from.
        slot: the replication slot name (default ``changefeed_<name or tables>``); the
            publication gets the same name unless ``publication`` is given.
        status_interval: seconds between standby status updates while streaming.
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
        **options: Any,
    ) -> None:
        tables = [t.strip() for t in table.split(",")] if isinstance(table, str) else list(table)
        tables = [t for t in tables if t]
        if not tables:
            raise ConfigurationError("no table given")
        super().__init__(",".join(tables), operation, connection=connection, **options)
        self.tables = tables
        self.dsn = _conninfo(connection)
        self.slot = slot or slot_name_for(options.get("name") or "_".join(tables))
        self.publication = publication or self.slot
        self.status_interval = status_interval
        self.snapshot_batch = snapshot_batch
        self.qualified_tables: list[str] = []
        self.primary_keys: dict[str, list[str]] = {}
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
            repl = self._replication = self._connect(replication=True)
            self._ensure_publication(conn)
            slot_exists = self._check_slot(conn, first_connection)
        except psycopg.OperationalError as exc:
            if first_connection:
                raise PermanentBackendError(_connect_failure(exc, self.dsn)) from exc
            raise
        self._connected_before = True

        if slot_exists and self.prefeed == "snapshot" and self._snapshot_pending(conn):
            log.warning("the snapshot of slot %s never completed: taking it again", self.slot)
            conn.execute("SELECT pg_drop_replication_slot(%s)", [self.slot])
            slot_exists = False
        if not slot_exists:
            snapshot = self.prefeed == "snapshot"
            consistent_point, snapshot_name = self._create_slot(repl, export_snapshot=snapshot)
            if snapshot:
                yield from self._read_snapshot(snapshot_name)
        yield from self._stream(repl)

    def _stream(self, repl: psycopg.Connection) -> Iterator[Change | None]:
        pgconn = repl.pgconn
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})"
        ).format(sql.Identifier(self.slot), sql.Literal(self.publication))
        pgconn.send_query(command.as_bytes(repl))
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = _text(result.error_message if result else b"") or _text(
                pgconn.get_error_message()
            )
            raise self._slot_error(message)
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
        self._close_sql()

        decoder = PgOutputDecoder(
            self.operation,
            loaders=psycopg_loaders(repl),
            tables=self.qualified_tables,
            primary_keys=self.primary_keys,
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
                        self._pending.append((last_emitted, event.end_lsn))
                        self._advance()
                    elif event.__class__ is Truncate:
                        log.warning("TRUNCATE of %s is not emitted as changes",
                                    ", ".join(event.tables))
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
        self, pgconn: pq.abc.PGconn, *, written: int | None = None, flush: int | None = None
    ) -> None:
        """Send a standby status update: received up to ``written``, delivered up to ``flush``
        (default: the acknowledged position; 0 tells the server nothing about delivery)."""
        now_us = int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US
        if flush is None:
            flush = self._flush_lsn
        if written is None:
            written = max(self._received_lsn, flush)
        message = _STANDBY_STATUS.pack(b"r", written, flush, flush, now_us, 0)
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
            if replication:
                conn.execute(_UTC)
            return conn
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
        except psycopg.OperationalError as exc:
            text = str(exc)
            if "connection option" in text or "invalid URI" in text:
                raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
            if "replication role" in text or "permission denied to start WAL sender" in text:
                raise PermanentBackendError(
                    f"role {_user(self.dsn)!r} lacks the REPLICATION privilege: as a superuser run"
                    f" ALTER ROLE {_user(self.dsn)} REPLICATION"
                ) from exc
            if "does not exist" in text or "authentication failed" in text:
                raise PermanentBackendError(_connect_failure(exc, self.dsn)) from exc
            raise

    def _check_server(self, conn: psycopg.Connection) -> None:
        (wal_level,) = conn.execute("SHOW wal_level").fetchone() or ("?",)
        if wal_level != "logical":
            raise PermanentBackendError(
                f"wal_level is {wal_level!r} but logical replication needs 'logical': run"
                " ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
            )
        qualified = []
        for table in self.tables:
            row = conn.execute(
                "SELECT n.nspname, c.relname, c.relkind FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.oid = to_regclass(%s)",
                [table],
            ).fetchone()
            if row is None or row[2] not in ("r", "p"):
                database = conn.info.dbname
                raise ConfigurationError(f"table {table!r} does not exist in database {database!r}")
            qualified.append(f"{row[0]}.{row[1]}")
        self.qualified_tables = qualified
        self.primary_keys = {table: self._key_columns(conn, table) for table in qualified}

    def _ensure_publication(self, conn: psycopg.Connection) -> None:
        publish = ", ".join(self.operation.names)
        ident = sql.Identifier(self.publication)
        tables = sql.SQL(", ").join(
            sql.Identifier(*name.split(".", 1)) for name in self.qualified_tables
        )
        row = conn.execute(
            "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = %s",
            [self.publication],
        ).fetchone()
        try:
            if row is None:
                conn.execute(
                    sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = {})").format(
                        ident, tables, sql.Literal(publish)
                    )
                )
                log.info("created publication %s for %s (%s)", self.publication,
                         ", ".join(self.qualified_tables), publish)
                return
            published = {
                f"{schema}.{name}"
                for schema, name in conn.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                    [self.publication],
                )
            }
            missing = [t for t in self.qualified_tables if t not in published]
            if missing:
                conn.execute(
                    sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                        ident,
                        sql.SQL(", ").join(sql.Identifier(*t.split(".", 1)) for t in missing),
                    )
                )
            has = Operation(0)
            for flag, on in zip((Operation.INSERT, Operation.UPDATE, Operation.DELETE), row,
                                strict=True):
                if on:
                    has |= flag
            if has != self.operation:
                conn.execute(
                    sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(
                        ident, sql.Literal(publish)
                    )
                )
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PermanentBackendError(
                f"cannot set up publication {self.publication}: {first_line(exc)}; the tables'"
                f" owner can run: CREATE PUBLICATION {self.publication} FOR TABLE"
                f" {', '.join(self.qualified_tables)} WITH (publish = '{publish}')"
            ) from exc

    def _check_slot(self, conn: psycopg.Connection, first_connection: bool) -> bool:
        """Whether the slot exists; raise a clear error if it cannot be used."""
        row = conn.execute(
            "SELECT plugin, database, active, active_pid, wal_status"
            " FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        if row is None:
            return False
        plugin, database, active, pid, wal_status = row
        if plugin != "pgoutput" or database != conn.info.dbname:
            raise ConfigurationError(
                f"slot {self.slot} exists but is not a pgoutput slot of database"
                f" {conn.info.dbname!r}: choose another name with --slot"
            )
        if wal_status == "lost":
            raise ResumeError(
                f"slot {self.slot} was invalidated: PostgreSQL removed WAL it still needed"
                f" (see max_slot_wal_keep_size); drop it (changefeed slots --drop {self.slot})"
                " and start again with --prefeed snapshot"
            )
        if active:
            message = f"slot {self.slot} is in use by another process (pid {pid})"
            if first_connection:
                raise PermanentBackendError(message + ": stop it, or use another --slot")
            raise TransientBackendError(message)  # likely our own previous walsender, ending
        return True

    def _slot_position(self, conn: psycopg.Connection | None) -> str | None:
        if conn is None:
            return None
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        return row[0] if row else None

    def _create_slot(self, repl: psycopg.Connection, *, export_snapshot: bool) -> tuple[str, str]:
        mode = "EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT"
        command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}").format(
            sql.Identifier(self.slot), sql.SQL(mode)
        )
        try:
            row = repl.execute(command).fetchone()
        except psycopg.errors.DuplicateObject as exc:
            raise TransientBackendError(f"slot {self.slot} was created meanwhile") from exc
        except psycopg.errors.ProgramLimitExceeded as exc:
            raise PermanentBackendError(
                f"cannot create slot {self.slot}: {first_line(exc)}"
                " (raise max_replication_slots or drop unused slots: changefeed slots)"
            ) from exc
        assert row is not None
        _, consistent_point, snapshot_name, _ = row
        log.info("created replication slot %s at %s", self.slot, consistent_point)
        if export_snapshot:
            self._mark_snapshot(_SNAPSHOT_PENDING)
        return consistent_point, snapshot_name

    # -- snapshot ------------------------------------------------------------------------------

    def _read_snapshot(self, snapshot_name: str) -> Iterator[Change | None]:
        """Every row of the tables as of the slot's creation, as snapshot inserts.

        Rows are handed out one behind the read, so the last one is known as the last before
        it is yielded: once it is acknowledged, the snapshot is recorded as delivered.
        """
        previous: Change | None = None
        for index, (table, row) in enumerate(self._snapshot_rows(snapshot_name), 1):
            keys = self.primary_keys.get(table, [])
            change = Change(
                Operation.INSERT, table, row, None, {column: row[column] for column in keys},
                make_position(0, index), None, None, True,
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

    def _snapshot_rows(self, snapshot_name: str) -> Iterator[tuple[str, dict[str, Any]]]:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as reader:
            reader.execute(_UTC)
            reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            reader.execute(
                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name))
            )
            for table in self.qualified_tables:
                relation = sql.Identifier(*table.split(".", 1))
                estimate = reader.execute(
                    "SELECT greatest(reltuples, 0)::bigint AS n FROM pg_class"
                    " WHERE oid = to_regclass(%s)",
                    [table],
                ).fetchone()
                total = estimate["n"] if estimate else 0
                if total == 0:  # never analysed: count, in the same snapshot
                    counted = reader.execute(
                        sql.SQL("SELECT count(*) AS n FROM {}").format(relation)
                    ).fetchone()
                    total = counted["n"] if counted else 0
                log.info("snapshot of %s: reading ~%s rows", table, f"{total:,}")
                started = last_report = time.monotonic()
                done = 0
                with reader.cursor(name="changefeed_snapshot") as cursor:
                    cursor.itersize = self.snapshot_batch
                    cursor.execute(sql.SQL("SELECT * FROM {}").format(relation))
                    for row in cursor:
                        done += 1
                        yield table, row
                        now = time.monotonic()
                        if now - last_report >= 2.0:
                            last_report = now
                            self.stats.extra["snapshot"] = (table, done, total)
                            log.info("snapshot of %s: %s / ~%s rows (%.0f rows/s)", table,
                                     f"{done:,}", f"{max(total, done):,}",
                                     done / (now - started))
                log.info("snapshot of %s: %s rows done", table, f"{done:,}")
            reader.execute("COMMIT")

    @staticmethod
    def _key_columns(conn: psycopg.Connection, table: str) -> list[str]:
        rows = conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY a.attnum",
            [table],
        ).fetchall()
        return [row[0] for row in rows]

    def _mark_snapshot(self, state: str) -> None:
        """Record on the publication whether the snapshot was delivered (a crash mid-snapshot
        must take it again: the slot alone cannot tell)."""
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
                        sql.Identifier(self.publication), sql.Literal(state)
                    )
                )
        except psycopg.Error as exc:
            log.warning("could not record the snapshot state on %s: %s", self.publication, exc)

    def _snapshot_pending(self, conn: psycopg.Connection) -> bool:
        row = conn.execute(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = %s",
            [self.publication],
        ).fetchone()
        return row is not None and row[0] == _SNAPSHOT_PENDING

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

    def _slot_error(self, message: str) -> Exception:
        if "is active for PID" in message:
            return TransientBackendError(f"slot {self.slot}: {message.strip()}")
        if "can no longer get changes" in message or "invalidated" in message:
            return ResumeError(
                f"slot {self.slot} was invalidated ({message.strip()}); drop it"
                f" (changefeed slots --drop {self.slot}) and start again with --prefeed snapshot"
            )
        if "does not exist" in message:
            return TransientBackendError(f"slot {self.slot}: {message.strip()}")
        return psycopg.OperationalError(message.strip() or "START_REPLICATION failed")

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


def _text(message: str | bytes | None) -> str:
    """libpq's messages come as bytes or str depending on the call: one stripped str."""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    return (message or "").strip()


def _user(dsn: str) -> str:
    try:
        return str(psycopg.conninfo.conninfo_to_dict(dsn).get("user") or "current user")
    except psycopg.ProgrammingError:
        return "current user"


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


def feed_from_url(
    url: str, table: str, operation: int = ALL, *, prefeed: Any = None, **options: Any
) -> PostgresChangeFeed:
    """The feed for a ``postgresql://`` URL (used by `get_changefeed` and the CLI)."""
    return PostgresChangeFeed(table, operation, prefeed=prefeed, connection=url, **options)


@get_changefeed.register(psycopg.Connection)
def _get_changefeed_for_psycopg(
    connection: psycopg.Connection,
    table: str,
    operation: int = ALL,
    *,
    prefeed: Any = None,
    **options: Any,
) -> PostgresChangeFeed:
    return PostgresChangeFeed(table, operation, prefeed=prefeed, connection=connection, **options)
