"""The acknowledgement ledger: which WAL position the slot may confirm. Pure, no I/O.

The feed tells it what the stream brings (`begin`, `commit`, `standalone_message`,
`keepalive`) and what the consumer acknowledged (`acknowledge`), and asks what to report
(`flush_lsn`, `status`). It moves the flush LSN past a transaction only once its last change is
acknowledged, and is the one record of the acknowledged position (ARCHITECTURE.md,
"Acknowledgement")."""

from __future__ import annotations

from collections import deque
from typing import Any

from changefeed.backends.postgres.position import PgPosition


class AckLedger:
    """Transactions read but not yet wholly acknowledged, and the LSNs they let the slot confirm.

    Args:
        acknowledged: the position the consumer acknowledged before (from the checkpoint; its
            text is read back as a `PgPosition`, anything else is not a stream position).
    """

    def __init__(self, acknowledged: Any = None) -> None:
        self.acknowledged: PgPosition | None = None
        """The last position the consumer acknowledged."""
        self.flush_lsn = 0
        """The end of the last transaction wholly delivered: what the slot may confirm."""
        self.received_lsn = 0
        """How far the stream was read (the standby status's write position)."""
        self.reported_lsn = 0
        """The flush LSN the server was last told."""
        self.closed_lsn = 0
        """The flush LSN when the last stream closed (told to the server, or given up)."""
        self.in_transaction = False
        self.held: int | None = None
        """While set, the server is not told of deliveries past this LSN (`hold`)."""
        self.snapshot_last: PgPosition | None = None
        """The position of the exported snapshot's last change until it is acknowledged."""
        # (last change handed out, or None for none; the LSN where the transaction ends)
        self._pending: deque[tuple[PgPosition | None, int]] = deque()
        self.acknowledge(acknowledged)

    # -- what the stream brings ----------------------------------------------------------------

    def restart(self) -> None:
        """A new stream starts: what the previous one read and did not deliver comes again."""
        self._pending.clear()
        self.in_transaction = False

    def begin(self) -> None:
        self.in_transaction = True

    def commit(self, last_handed_out: PgPosition | None, end_lsn: int) -> None:
        """A transaction ended at ``end_lsn``; ``last_handed_out`` is its last change given to
        the consumer (None if the feed gave none: its operations were all filtered out)."""
        self.in_transaction = False
        self.received_lsn = end_lsn
        self._pending.append((last_handed_out, end_lsn))
        self.advance()

    def standalone_message(self, position: PgPosition, lsn: int) -> None:
        """A non-transactional message at ``lsn``: no Commit follows it, so once acknowledged
        the slot may pass it."""
        self.received_lsn = max(self.received_lsn, lsn)
        self._pending.append((position, lsn))

    def received(self, lsn: int) -> None:
        """The stream was read up to ``lsn`` (messages kept for later, not yet decoded)."""
        self.received_lsn = max(self.received_lsn, lsn)

    def keepalive(self, wal_end: int) -> None:
        """The server's WAL reaches ``wal_end``. When everything received is delivered, the
        slot may move there too: an idle feed must not make the server keep WAL."""
        if not self._pending and not self.in_transaction:
            self.flush_lsn = max(self.flush_lsn, wal_end)
            self.received_lsn = max(self.received_lsn, wal_end)

    # -- what the consumer acknowledges --------------------------------------------------------

    def acknowledge(self, position: Any) -> None:
        """Every change up to ``position`` was delivered. A value that is no stream position
        (None, a caller's prefeed item) changes nothing."""
        if position.__class__ is not PgPosition:
            position = PgPosition.of(position) if position is not None else None
            if position is None:
                return
        self.acknowledged = position
        self.advance()

    def advance(self) -> None:
        """Move the flush LSN past every transaction whose changes are all acknowledged."""
        pending = self._pending
        acknowledged = self.acknowledged
        while pending:
            last, end_lsn = pending[0]
            if last is not None and (acknowledged is None or last > acknowledged):
                break
            pending.popleft()
            self.flush_lsn = max(self.flush_lsn, end_lsn)

    @property
    def replay_after(self) -> PgPosition | None:
        """Changes at or before this position were delivered already: a stream drops them
        (None: nothing was)."""
        return self.acknowledged

    def delivered(self, position: PgPosition | None) -> bool:
        """Whether the change at ``position`` was acknowledged (None: no change, False)."""
        acknowledged = self.acknowledged
        return position is not None and acknowledged is not None and position <= acknowledged

    def snapshot_delivered(self) -> bool:
        """True once, when the exported snapshot's last change has been acknowledged."""
        if not self.delivered(self.snapshot_last):
            return False
        self.snapshot_last = None
        return True

    # -- what to tell the server ---------------------------------------------------------------

    def hold(self, lsn: int) -> None:
        """Tell the server of no delivery past ``lsn`` until `release` (the earliest of the
        holds stands): what comes after must be streamed again after a restart, because the
        feed has not recorded what it learnt from it (a back-fill's rows to read again)."""
        self.held = lsn if self.held is None else min(self.held, lsn)

    def release(self) -> None:
        self.held = None

    @property
    def confirmable_lsn(self) -> int:
        """What the slot may confirm: the flush LSN, unless `hold` keeps it back."""
        held = self.held
        return self.flush_lsn if held is None or self.flush_lsn < held else held

    @property
    def flush_due(self) -> bool:
        """An acknowledgement moved the flush LSN beyond what the server was told."""
        return self.confirmable_lsn > self.reported_lsn

    def status(self) -> tuple[int, int]:
        """(written, flushed) for a standby status update."""
        flush = self.confirmable_lsn
        return max(self.received_lsn, flush), flush

    def reported(self, flushed: int) -> None:
        """The server was told ``flushed`` (0 tells it nothing)."""
        if flushed:
            self.reported_lsn = flushed

    def stream_closed(self) -> None:
        """The stream closed, its last status sent (or given up with the connection)."""
        self.closed_lsn = self.confirmable_lsn

    @property
    def acknowledged_after_close(self) -> bool:
        """An acknowledgement after the stream closed moved the flush LSN: the slot must be
        told without a stream."""
        return self.confirmable_lsn > max(self.closed_lsn, self.reported_lsn)

    def undelivered(self, *, backlog: bool = False) -> bool:
        """Whether something received is not yet delivered: a transaction open or pending,
        or (``backlog``) stream read ahead and kept for later. The flush position must then
        not move to the server's end."""
        return backlog or self.in_transaction or bool(self._pending)

    def delivered_through(self, lsn: int) -> bool:
        """Whether the stream was read up to ``lsn`` and all of it delivered."""
        return self.received_lsn >= lsn and not self._pending and not self.in_transaction
