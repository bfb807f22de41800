"""The stream loop of a PostgreSQL feed: the frames `stream` reads, decoded (`pgoutput`, or the
compiled direct path's `Lines`) and dispatched: changes handed out, transactions recorded in the
ledger, the back-fills' messages taken, and between reads what needs doing while the stream is
quiet (status updates, structure checks, renames, the idle check). `PostgresChangeFeed` takes
these methods from `StreamLoop`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from changefeed._speedups import Lines
from changefeed.backends.postgres import slots
from changefeed.backends.postgres.backfill import Backfills
from changefeed.backends.postgres.chunks import BACKFILL_PREFIX, WATERMARK_PREFIX
from changefeed.backends.postgres.connection import MESSAGES_VERSION, connect
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.loading import psycopg_loaders
from changefeed.backends.postgres.pgoutput import (
    Begin,
    Commit,
    PgOutputDecoder,
    Renamed,
    Truncated,
)
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.stream import ReplicationStream
from changefeed.backends.postgres.structure import CHECK_SECONDS
from changefeed.backends.postgres.tables import WatchedTables
from changefeed.backends.postgres.tracing import LatencyTrace
from changefeed.change import Change, Operation
from changefeed.message import Message

log = logging.getLogger("changefeed.postgres")

_OWN_PREFIXES = (WATERMARK_PREFIX, BACKFILL_PREFIX)
"""Messages changefeed writes for itself (see `chunks`): handled, never handed out."""


class StreamLoop:
    """The part of `PostgresChangeFeed` that runs the stream: the feed's state it reads and
    changes is declared below (set by the feed's ``__init__`` and start); the reactions to DDL
    it calls are `ddl.StructureReactions`'."""

    slot: str
    publication: str
    operation: Operation
    messages: tuple[str, ...]
    status_interval: float
    stats: Any
    dsn: str
    _ledger: AckLedger
    _tables: WatchedTables
    _backfills: Backfills
    _server_version: int
    _sql: psycopg.Connection | None
    _stream: ReplicationStream | None
    _line_format: tuple[str, Any, Any] | None
    _decoder: PgOutputDecoder | None
    _renames: dict[int, tuple[str, int]]
    _idle: IdleCheck
    _settle: Callable[[], None]
    _watch_structure: Callable[[psycopg.Connection], None]
    _apply_renames: Callable[[int], None]
    _renamed: Callable[..., None]
    _end_if_dropped_tables_delivered: Callable[[ReplicationStream], None]

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
        trace = LatencyTrace.from_environment()  # None unless a benchmark asks (`tracing`)
        idle = self._idle

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
                        stream.note_begin(event.committed_at)  # how far behind (pacing)
                        last_emitted = None
                    elif event.__class__ is Commit:
                        stream.committed(last_emitted, event.end_lsn)
                        stream.note_commit(event.committed_at)  # how far behind (pacing)
                        if trace is not None:
                            trace.committed(event.committed_at, stream.sent_at)
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
                if trace is not None:
                    trace.handing_over()
                yield None  # caught up: the consumer may flush and acknowledge now
                if trace is not None:
                    trace.flushed()
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
                if idle.wanted:
                    idle.quiet(stream, self._sql, self.stats.changes, now)
                if trace is not None:
                    trace.quiet_work()
                if not stream.wait(1.0):
                    yield None
            raise stream.ended()
        except GeneratorExit:  # the consumer stopped, maybe right after a transaction's last change
            if ledger.in_transaction and last_emitted is not None:
                end_lsn = stream.read_to_commit(decode_changes, last_emitted)
                if end_lsn is not None and backfills.finished:
                    backfills.committed(end_lsn)
            raise
        finally:
            if trace is not None:
                trace.close()


class IdleCheck:
    """Whether a quiet stream is caught up with the server: the server's WAL position is noted
    when the stream goes quiet (again at most every `SAMPLE_SECONDS` while changes come), and
    the walsender asked how far it has read; caught up once its keepalive passes that
    position with no change handed out since.

    Only once someone asked (``wanted``, set by `PostgresChangeFeed.source_caught_up`: a reader
    with an idle timeout): the query is a round trip on the plain connection, which holds up
    the stream loop and every change behind it (up to 5 a second, each 1-5 ms on a busy
    machine, in the latency trace of ``benchmarks/bench_latency.py``)."""

    SAMPLE_SECONDS = 0.2
    ASK_SECONDS = 1.0

    def __init__(self) -> None:
        self.wanted = False
        self.target: int | None = None
        self.changes = -1  # the feed's change count when the target was noted
        self.sampled = self.asked = 0.0

    def quiet(self, stream: ReplicationStream, conn: psycopg.Connection | None, changes: int,
              now: float) -> None:
        """The stream has nothing at hand: note the server's WAL position if changes came
        since, or ask the walsender again how far it has read."""
        if not self.wanted or conn is None or conn.closed:
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
