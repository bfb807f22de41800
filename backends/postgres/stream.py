"""The replication connection while it streams: START_REPLICATION, standby status updates, and
the read-ahead that keeps the walsender answered while the consumer is busy elsewhere.

The feed's stream loop (`feed.PostgresChangeFeed._stream_changes`) reads and decodes the messages;
this is the rest of the conversation with the walsender, whose rules are easy to get wrong:

* the flush position sent is only ever what the `ledger` says was delivered;
* the walsender ends a connection that stays silent for ``wal_sender_timeout``, and a fast
  shutdown of the server waits until the client has confirmed everything it was sent, so a
  busy consumer's feed must still read and answer (`read_ahead`);
* a consumer may stop between a transaction's last change and its Commit (`read_to_commit`),
  and the last status must reach the server before the connection goes (`finish`).
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq, sql

from changefeed.backends.postgres.errors import start_replication_error, stream_ended, text
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.pgoutput import Commit
from changefeed.backends.postgres.protocol import (
    KEEPALIVE,
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


class ReplicationStream:
    """One START_REPLICATION on a replication connection (see `start`).

    ``backlog`` holds messages `read_ahead` read while the consumer was busy, as
    ``(nbytes, buffer)`` pairs from ``get_copy_data``: the stream loop takes them before
    reading the socket again, and subtracts their XLogData from ``backlog_bytes``.
    """

    BACKLOG_LIMIT = 64 * 1024 * 1024
    """Bytes of stream `read_ahead` holds before it lets go of the connection instead."""
    FINISH_SECONDS = 5.0
    """How long `finish` waits for the server to confirm the end of the stream."""
    COMMIT_WAIT_SECONDS = 2.0
    """How long `read_to_commit` waits for the Commit behind the last change handed out."""

    def __init__(
        self, repl: psycopg.Connection, ledger: AckLedger, status_interval: float
    ) -> None:
        self.repl = repl
        self.pgconn = repl.pgconn
        self.ledger = ledger
        self.status_interval = status_interval
        self.backlog: deque[tuple[int, Any]] = deque()
        self.backlog_bytes = 0
        self.usable = True
        """False once `read_ahead` met the stream's end or an error: the loop meets it too."""
        self.last_status = time.monotonic()

    @classmethod
    def start(
        cls, repl: psycopg.Connection, slot: str, publication: str, *, messages: bool,
        ledger: AckLedger, status_interval: float,
    ) -> ReplicationStream:
        """Start streaming ``slot`` from its confirmed position. ``messages``: also ask for
        logical decoding messages (PostgreSQL 14+)."""
        pgconn = repl.pgconn
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}{})"
        ).format(sql.Identifier(slot), sql.Literal(publication),
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
        return cls(repl, ledger, status_interval)

    def send_status(
        self, *, written: int | None = None, flush: int | None = None, reply: bool = False
    ) -> None:
        """Send a standby status update: received up to ``written``, delivered up to ``flush``
        (default: what the ledger says; 0 tells the server nothing about delivery); ``reply``
        asks the server for a keepalive telling how far its WAL goes."""
        ledger = self.ledger
        if flush is None:
            flush = ledger.flush_lsn
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
            deadline = time.monotonic() + self.FINISH_SECONDS
            while True:  # what the server still sends before its CopyDone is not wanted now
                nbytes, _ = self.read(deadline)
                if nbytes < 0:
                    break
                if nbytes == 0:
                    log.debug("the server did not confirm the end of the stream in time")
                    return
            while pgconn.is_busy():  # the command's result: the walsender let go of the slot
                if not self._wait_readable(deadline):
                    return
                pgconn.consume_input()
            while pgconn.get_result() is not None:
                pass
        except psycopg.Error as exc:
            log.debug("finish: %s", first_line(exc))
        finally:
            self.usable = False

    def _wait_readable(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        return remaining > 0 and bool(select.select([self.pgconn.socket], [], [], remaining)[0])

    def read(self, deadline: float) -> tuple[int, Any]:
        """The next message as ``get_copy_data`` gives it (the backlog first), waiting until
        ``deadline`` (monotonic) at most: ``(0, None)`` when none came in time."""
        if self.backlog:  # as the feed's stream loop takes it (see `backlog`)
            nbytes, buffer = self.backlog.popleft()
            if nbytes > 0 and buffer[0] == XLOGDATA:
                self.backlog_bytes -= nbytes
            return nbytes, buffer
        pgconn = self.pgconn
        while True:
            nbytes, buffer = pgconn.get_copy_data(1)
            if nbytes != 0:
                return nbytes, buffer
            if not self._wait_readable(deadline):
                return 0, None
            pgconn.consume_input()

    def read_to_commit(self, decode: Callable[[Any], Any], last: str) -> int | None:
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
                nbytes, buffer = self.read(deadline)
                if nbytes <= 0:
                    return None
                if buffer[0] != XLOGDATA:
                    continue
                event = decode(buffer[XLOGDATA_HEADER_SIZE:])
                if event.__class__ is Commit:
                    self.ledger.commit(last, event.end_lsn)
                    return event.end_lsn
                if event.__class__ is Change or event.__class__ is Message:
                    return None
        except psycopg.Error as exc:
            log.debug("reading on to the commit: %s", first_line(exc))
            return None

    def ended(self, nbytes: int) -> Exception:
        """The error for the end of the stream (``get_copy_data`` returned ``nbytes`` < 0)."""
        message = text(self.pgconn.get_error_message())
        if nbytes == -1:
            result = self.pgconn.get_result()
            if result is not None and result.error_message:
                message = text(result.error_message)
        return stream_ended(message)

    def read_ahead(self) -> None:
        """Read what the server sent into the backlog and answer its keepalives.

        The write position answered is what was received; the flush position the acknowledged
        one, or, while something received is not yet delivered, left unset (0), which
        PostgreSQL ignores for the slot and which lets a shutting-down walsender judge by the
        write position. The slot keeps its confirmed position, so nothing is lost. A backlog
        over `BACKLOG_LIMIT` closes the connection instead (the server is free; the feed
        reconnects from the slot when the consumer is back).
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
                elif buffer[0] == KEEPALIVE:  # the stream loop sees it again later
                    wal_end, _, reply_requested = keepalive(buffer)
                    if reply_requested:
                        self._answer_while_busy(wal_end)
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

    def _answer_while_busy(self, wal_end: int) -> None:
        ledger = self.ledger
        if ledger.undelivered(backlog=self.backlog_bytes > 0):
            self.send_status(written=max(ledger.received_lsn, wal_end), flush=0)
        else:
            ledger.keepalive(wal_end)
            self.send_status()
