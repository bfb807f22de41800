"""The replication connection while it streams: every read of its socket, standby status
updates, and the read-ahead that keeps the walsender answered while the consumer is busy.

`ReplicationStream.frames` hands out the pgoutput payloads in stream order (None when nothing
more is at hand: then `wait`) and answers keepalives itself; the feed decodes and dispatches.
The rules of the conversation with the walsender: ARCHITECTURE.md, "The walsender conversation"."""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import psycopg
from psycopg import pq, sql

import changefeed._speedups as _speedups
from changefeed.backends.postgres.errors import start_replication_error, stream_ended, text
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.names import publication_names_literal
from changefeed.backends.postgres.pacing import ReadPacing, waiting_bytes
from changefeed.backends.postgres.pgoutput import Commit, Truncated
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.protocol import (
    KEEPALIVE,
    PG_EPOCH_OFFSET_US,
    XLOGDATA,
    XLOGDATA_HEADER_SIZE,
    keepalive,
    standby_status,
    xlogdata_header,
)
from changefeed.change import Change
from changefeed.errors import first_line
from changefeed.message import Message

log = logging.getLogger("changefeed.postgres")

ENDED: Any = object()
"""What `ReplicationStream` reads return once the stream ended."""


class ReplicationStream:
    """One START_REPLICATION on a replication connection (see `start`).

    ``backlog`` holds messages `read_ahead` read while the consumer was busy, as
    ``(nbytes, buffer)`` pairs from ``get_copy_data``: `frames` takes them before reading the
    socket again, and subtracts their XLogData from ``backlog_bytes``.
    """

    BACKLOG_LIMIT = 64 * 1024 * 1024
    """Bytes of stream `read_ahead` holds before it lets go of the connection instead."""
    FINISH_SECONDS = 5.0
    """How long `finish` waits for the server to confirm the end of the stream."""
    COMMIT_WAIT_SECONDS = 2.0
    """How long `read_to_commit` waits for the Commit behind the last change handed out."""

    def __init__(
        self, repl: psycopg.Connection, ledger: AckLedger, status_interval: float,
        stats: Any = None,
    ) -> None:
        self.repl = repl
        self.pgconn = repl.pgconn
        self.ledger = ledger
        self.stats = stats
        """Where the lag behind the server's WAL is noted (``lag_bytes``), if given."""
        self.status_interval = status_interval
        self.backlog: deque[tuple[int, Any]] = deque()
        self.backlog_bytes = 0
        self.usable = True
        """False once `read_ahead` met the stream's end or an error: the loop meets it too."""
        self.last_status = time.monotonic()
        self.frames: Iterator[Any] = (
            _speedups.kernels.FrameReader(self, _speedups.libpq_functions())
            if _speedups.kernels is not None else self._frames())
        """The pgoutput payloads of the XLogData messages, in stream order; None whenever
        nothing more is at hand (`wait`, then iterate on); it ends with the stream (`ended`).
        The compiled `FrameReader` where the extension is built (`_frames` is the reference),
        which also hands the direct path's decoder the row changes at hand."""
        self.wal_end = 0
        """How far the walsender has read (decoded) the server's WAL, as its last keepalive
        said: it passes the server's WAL position once everything before was sent."""
        self._xlogdata: Any = None  # the last XLogData message handed out
        self._end = 0  # get_copy_data's result at the end of the stream
        self._closing = False  # CopyDone sent: nothing is answered any more
        self.pacing = ReadPacing()
        # For `sent_behind`: the commit time (Unix seconds) of the transaction being read, from
        # its Begin (None between transactions), and the last Commit's own delay.
        self._reading_committed: float | None = None
        self._last_commit_behind: float | None = None
        # `wait`'s one wait per wake-up: the socket registered once (select.select builds
        # its sets on every call).
        self._readable = select.poll()
        self._readable.register(self.pgconn.socket, select.POLLIN)
        self._either: tuple[int, Any] | None = None  # `wait_either`'s fd and poll object

    @classmethod
    def start(
        cls, repl: psycopg.Connection, slot: str, publication: str, *, messages: bool,
        ledger: AckLedger, status_interval: float, stats: Any = None,
    ) -> ReplicationStream:
        """Start streaming ``slot`` from its confirmed position. ``messages``: also ask for
        logical decoding messages (PostgreSQL 14+)."""
        pgconn = repl.pgconn
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}{})"
        ).format(sql.Identifier(slot), sql.SQL(publication_names_literal([publication])),
                 sql.SQL(", messages 'true'" if messages else ""))
        pgconn.send_query(command.as_bytes(repl))
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = text(result.error_message if result else b"") or text(
                pgconn.get_error_message()
            )
            code = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            raise start_replication_error(slot, text(code), message)
        ledger.restart()
        return cls(repl, ledger, status_interval, stats)

    # -- reading -------------------------------------------------------------------------------

    def _frames(self) -> Iterator[Any]:
        # One iteration per message, hundreds of thousands a second: locals, no waiting.
        backlog = self.backlog
        get_copy_data = self.pgconn.get_copy_data
        while True:
            if backlog:  # read ahead while the consumer was busy: those come first
                nbytes, buffer = backlog.popleft()
                if nbytes > 0 and buffer[0] == XLOGDATA:
                    self.backlog_bytes -= nbytes
            else:
                nbytes, buffer = get_copy_data(1)
            if nbytes > 0:
                if buffer[0] == XLOGDATA:
                    self._xlogdata = buffer
                    yield buffer[XLOGDATA_HEADER_SIZE:]
                elif buffer[0] == KEEPALIVE:
                    self._keepalive(buffer, busy=False)
            elif nbytes == 0:
                yield None
            else:
                self._end = nbytes
                return

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the server to send more; False if it did not.
        (Frames `read_ahead` kept come first and need no waiting: see `caught_up`.)

        Once per wake-up, thousands a second on a live stream: one poll and one read of the
        socket; only a backlog also asks how much waits there (`ReadPacing`)."""
        behind = self.sent_behind
        if behind is not None:
            pacing = self.pacing
            if pacing.reading_backlog(behind):
                pause = pacing.pause(waiting_bytes(self.pgconn.socket), behind)
                if pause:
                    time.sleep(pause)
        if not self._readable.poll(timeout * 1000):  # milliseconds, rounded up
            return False
        self.pgconn.consume_input()
        return True

    def wait_either(self, timeout: float | None, fd: int) -> bool:
        """Wait at most ``timeout`` seconds (None: as long as it takes) until the server sent
        more or ``fd`` is readable, whichever comes first: True if the server did (or frames
        read ahead wait), False if only ``fd`` became readable or the time passed. For a
        consumer that waits for its own workers (`ChangeFeed.wait_for_source`); nothing is
        read here: the loop reads, and paces its reads (`wait`), when it runs again."""
        if self.backlog:
            return True
        either = self._either
        if either is None or either[0] != fd:
            poller = select.poll()
            poller.register(self.pgconn.socket, select.POLLIN)
            poller.register(fd, select.POLLIN)
            either = self._either = (fd, poller)
        ready = either[1].poll(None if timeout is None else timeout * 1000)
        return any(one != fd for one, _ in ready)

    @property
    def caught_up(self) -> bool:
        """Nothing read ahead waits to be handed out."""
        return not self.backlog

    def _next(self, deadline: float) -> Any:
        """The next frame, waiting until ``deadline`` (monotonic) at most: None when none came
        in time, `ENDED` when the stream ended."""
        for payload in self.frames:
            if payload is not None:
                return payload
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait(remaining):
                return None
        return ENDED

    def ended(self) -> Exception:
        """The error for the end of the stream (`frames` ended)."""
        message = text(self.pgconn.get_error_message())
        code = None
        if self._end == -1:
            result = self.pgconn.get_result()
            if result is not None and result.error_message:
                message = text(result.error_message)
                code = text(result.error_field(pq.DiagnosticField.SQLSTATE)) or None
        return stream_ended(message, code)

    def committed(self, last_handed_out: PgPosition | None, end_lsn: int) -> None:
        """The transaction whose last change handed out was ``last_handed_out`` ended at
        ``end_lsn`` (its Commit was the last frame): tell the ledger, note the lag."""
        self.ledger.commit(last_handed_out, end_lsn)
        if self.stats is not None:
            frames = self.frames
            wal_end = getattr(frames, "wal_end", None)  # the compiled reader keeps it
            if wal_end is None and self._xlogdata is not None:
                wal_end = xlogdata_header(self._xlogdata)[1]
            if wal_end:
                self.stats.lag_bytes = max(0, wal_end - end_lsn)

    def note_begin(self, committed_at: datetime) -> None:
        """The stream loop read the Begin of a transaction committed at ``committed_at``: its
        frames are judged by it from now on (`sent_behind`, for the read pacing)."""
        self._reading_committed = committed_at.timestamp()

    def note_commit(self, committed_at: datetime) -> None:
        """The stream loop read the Commit of a transaction committed at ``committed_at``: until
        the next Begin, the stream is judged by how long after it this Commit was sent."""
        self._reading_committed = None
        self._last_commit_behind = self._sent_after(committed_at.timestamp())

    @property
    def sent_behind(self) -> float | None:
        """How many seconds after its transaction's commit the walsender sent the last frame
        read, both by the server's clock (None before any transaction): a backlog's long after,
        a live stream's at once, however long its consumer then took or idled before it asked
        for more. Within a transaction, its own frames decide from its Begin on, so a live one
        read right after a backlog is not taken for the backlog, and one transaction too large
        to be sent at once becomes a backlog as its frames fall behind its commit. Between
        transactions, the last Commit decides (messages outside transactions have no commit
        time to be judged by)."""
        committed = self._reading_committed
        if committed is None:
            return self._last_commit_behind
        return self._sent_after(committed)

    def _sent_after(self, committed: float) -> float | None:
        sent_at = self.sent_at
        return (sent_at + PG_EPOCH_OFFSET_US) / 1e6 - committed if sent_at else None

    @property
    def sent_at(self) -> int:
        """The walsender's send time in the header of the last XLogData message handed out
        (microseconds since 2000-01-01; 0 if none yet)."""
        sent_at = getattr(self.frames, "sent_at", None)  # the compiled reader keeps it
        if sent_at is None:
            sent_at = xlogdata_header(self._xlogdata)[2] if self._xlogdata is not None else 0
        return int(sent_at)

    def read_to_commit(
        self, decode: Callable[[Any], Any], last: PgPosition
    ) -> int | None:
        """Read on to the Commit of the open transaction, whose changes were handed out up to
        ``last``, record it in the ledger and return where the transaction ends; give up
        (None) at a change not handed out (then the transaction was not wholly delivered) or
        after `COMMIT_WAIT_SECONDS`.

        For a consumer that stops right after a transaction's last change (a limit, a
        deadline, a stop request): the ledger can only let the slot pass that transaction once
        it knows where it ends, or the next run would start with it again."""
        deadline = time.monotonic() + self.COMMIT_WAIT_SECONDS
        try:
            while True:
                payload = self._next(deadline)
                if payload is None or payload is ENDED:
                    return None
                event = decode(payload)
                if event.__class__ is Commit:
                    self.committed(last, event.end_lsn)
                    return event.end_lsn
                if event.__class__ is Change or event.__class__ is Message or (
                        event.__class__ is Truncated and event.items):
                    return None
        except psycopg.Error as exc:
            log.debug("reading on to the commit: %s", first_line(exc))
            return None

    # -- answering -----------------------------------------------------------------------------

    def send_status(
        self, *, written: int | None = None, flush: int | None = None, reply: bool = False
    ) -> None:
        """Send a standby status update: received up to ``written``, delivered up to ``flush``
        (default: what the ledger says; 0 tells the server nothing about delivery); ``reply``
        asks the server for a keepalive telling how far its WAL goes."""
        ledger = self.ledger
        if flush is None:
            flush = ledger.confirmable_lsn
        if written is None:
            written = max(ledger.received_lsn, flush)
        message = standby_status(written, flush, unix_time=time.time(), reply=reply)
        pgconn = self.pgconn
        if pgconn.put_copy_data(message) != 1 or pgconn.flush() != 0:
            raise psycopg.OperationalError(
                text(pgconn.get_error_message()) or "could not send the standby status"
            )
        self.last_status = time.monotonic()
        ledger.reported(flush)

    def status_due(self, now: float) -> bool:
        """Whether to send a status now: the interval passed, or an acknowledgement moved
        the flush position."""
        return now - self.last_status >= self.status_interval or self.ledger.flush_due

    def _keepalive(self, buffer: Any, *, busy: bool) -> None:
        """A primary keepalive: the server's WAL reaches its end. In stream order (not
        ``busy``) an idle slot may move there. Read ahead (``busy``), XLogData before it may
        wait in the backlog: while anything received is undelivered, the answer leaves the
        flush position unset (0), which PostgreSQL ignores for the slot and which lets a
        shutting-down walsender judge by the write position; the slot keeps its place."""
        wal_end, _, reply_requested = keepalive(buffer)
        self.keepalive_at(wal_end, reply_requested, busy)

    def keepalive_at(self, wal_end: int, reply_requested: bool, busy: bool) -> None:
        """`_keepalive` of a message already taken apart: the compiled frame reader reads
        keepalives itself (on a live stream PostgreSQL 15+ sends one nearly every transaction,
        each time its walsender waits for WAL while the consumer's last status is behind)."""
        if self._closing:
            return
        if wal_end > self.wal_end:
            self.wal_end = wal_end
        ledger = self.ledger
        if busy:
            if not reply_requested:
                return
            if ledger.undelivered(backlog=self.backlog_bytes > 0):
                self.send_status(written=max(ledger.received_lsn, wal_end), flush=0)
                return
        elif self.stats is not None:
            self.stats.lag_bytes = max(0, wal_end - ledger.received_lsn)
        ledger.keepalive(wal_end)
        if reply_requested:
            self.send_status()

    def read_ahead(self) -> None:
        """Read what the server sent into the backlog and answer its keepalives (see
        `_keepalive`); `frames` hands the backlog out first.

        A backlog over `BACKLOG_LIMIT` closes the connection instead (the server is free; the
        feed reconnects from the slot when the consumer is back).
        """
        if not self.usable or self.repl.closed:
            return
        pgconn = self.pgconn
        backlog = self.backlog
        try:
            pgconn.consume_input()
            while self.backlog_bytes <= self.BACKLOG_LIMIT:
                nbytes, buffer = pgconn.get_copy_data(1)
                if nbytes == 0:
                    break
                backlog.append((nbytes, buffer))
                if nbytes < 0:  # the stream ended: the loop reports it in its turn
                    self.usable = False
                    return
                if buffer[0] == XLOGDATA:
                    self.backlog_bytes += nbytes
                    self.ledger.received(xlogdata_header(buffer)[0])
                elif buffer[0] == KEEPALIVE:  # `frames` sees it again in its turn
                    self._keepalive(buffer, busy=True)
            if self.backlog_bytes > self.BACKLOG_LIMIT:
                log.warning(
                    "the sink is behind by more than %s MB of stream: closing the replication"
                    " connection until it catches up", self.BACKLOG_LIMIT // 2**20,
                )
                self.send_status()
                self.usable = False
                self.repl.close()
                return
            if time.monotonic() - self.last_status >= min(self.status_interval, 5.0):
                self.send_status()
        except psycopg.Error as exc:  # the stream loop meets the same failure and reconnects
            log.debug("keep_alive: %s", first_line(exc))
            self.usable = False

    # -- the end -------------------------------------------------------------------------------

    def finish(self) -> None:
        """End the stream as the protocol asks: the last standby status, then CopyDone, then
        wait (at most `FINISH_SECONDS`) for the server's CopyDone and the command's end.

        The server answers CopyDone only after it has read the status before it, and ends the
        command only after it released the slot. So when this returns, the slot has taken the
        flush position and is free for the next run. Otherwise a status written just before
        the connection closes may be lost with it (the walsender may fail writing to the
        closed socket before it reads what is left there), and a run started right after this
        one may find the slot still in use."""
        if self.repl.closed or self.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            return
        pgconn = self.pgconn
        try:
            self.send_status()
            if pgconn.put_copy_end() != 1 or pgconn.flush() != 0:
                return
            self._closing = True
            deadline = time.monotonic() + self.FINISH_SECONDS
            while True:  # what the server still sends before its CopyDone is not wanted now
                payload = self._next(deadline)
                if payload is ENDED:
                    break
                if payload is None:
                    log.debug("the server did not confirm the end of the stream in time")
                    return
            while pgconn.is_busy():  # the command's result: the walsender let go of the slot
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([pgconn.socket], [], [], remaining)[0]:
                    return
                pgconn.consume_input()
            while pgconn.get_result() is not None:
                pass
        except psycopg.Error as exc:
            log.debug("finish: %s", first_line(exc))
        finally:
            self.usable = False
