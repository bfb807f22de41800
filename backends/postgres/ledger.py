"""The acknowledgement ledger: which WAL position the slot may confirm. Pure, no I/O.

A slot confirms one LSN (the standby status's flush position); the server may recycle every
WAL record before it, and after a restart streams from there again. The consumer, though,
acknowledges *changes*, by position (commit LSN and index, see `pgoutput`), and several
transactions may be read ahead of what it has delivered. So the ledger keeps, per transaction
read, the position of its last change handed out and the LSN where it ends, and moves the flush
LSN past a transaction only once that last change is acknowledged. A crash then replays a
partly delivered transaction (at least once) and never skips part of one; the feed drops the
replayed changes at or before the acknowledged position.

The feed tells the ledger what the stream brings (`begin`, `commit`, `standalone_message`,
`keepalive`) and what the consumer acknowledged (`acknowledge`); it asks what to report
(`flush_lsn`, `status`) and whether something received is not yet delivered.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class AckLedger:
    """Transactions read but not yet wholly acknowledged, and the LSNs they let the slot confirm.

    Args:
        acknowledged: the position the consumer acknowledged before (from the checkpoint).
    """

    def __init__(self, acknowledged: Any = None) -> None:
        self.acknowledged: Any = acknowledged
        """The last position the consumer acknowledged."""
        self.flush_lsn = 0
        """The end of the last transaction wholly delivered: what the slot may confirm."""
        self.received_lsn = 0
        """How far the stream was read (the standby status's write position)."""
        self.reported_lsn = 0
        """The flush LSN the server was last told."""
        self.in_transaction = False
        self.snapshot_last: str | None = None
        """The position of the exported snapshot's last change until it is acknowledged."""
        # (last change handed out, or None for none; the LSN where the transaction ends)
        self._pending: deque[tuple[str | None, int]] = deque()

    # -- what the stream brings ----------------------------------------------------------------

    def restart(self) -> None:
        """A new stream starts: what the previous one read and did not deliver comes again."""
        self._pending.clear()
        self.in_transaction = False

    def begin(self) -> None:
        self.in_transaction = True

    def commit(self, last_handed_out: str | None, end_lsn: int) -> None:
        """A transaction ended at ``end_lsn``; ``last_handed_out`` is its last change given to
        the consumer (None if the feed gave none: its operations were all filtered out)."""
        self.in_transaction = False
        self.received_lsn = end_lsn
        self._pending.append((last_handed_out, end_lsn))
        self.advance()

    def standalone_message(self, position: str, lsn: int) -> None:
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
        """Every change up to ``position`` was delivered."""
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
    def replay_after(self) -> str | None:
        """The acknowledged position as a stream position: changes at or before it were
        delivered already (None: nothing was)."""
        acknowledged = self.acknowledged
        return acknowledged if isinstance(acknowledged, str) else None

    def snapshot_delivered(self) -> bool:
        """True once, when the exported snapshot's last change has been acknowledged."""
        last = self.snapshot_last
        if last is None or self.acknowledged is None or self.acknowledged < last:
            return False
        self.snapshot_last = None
        return True

    # -- what to tell the server ---------------------------------------------------------------

    @property
    def flush_due(self) -> bool:
        """An acknowledgement moved the flush LSN beyond what the server was told."""
        return self.flush_lsn > self.reported_lsn

    def status(self) -> tuple[int, int]:
        """(written, flushed) for a standby status update."""
        return max(self.received_lsn, self.flush_lsn), self.flush_lsn

    def reported(self, flushed: int) -> None:
        """The server was told ``flushed`` (0 tells it nothing)."""
        if flushed:
            self.reported_lsn = flushed

    def undelivered(self, *, backlog: bool = False) -> bool:
        """Whether something received is not yet delivered: a transaction open or pending,
        or (``backlog``) stream read ahead and kept for later. The flush position must then
        not move to the server's end."""
        return backlog or self.in_transaction or bool(self._pending)

    def delivered_through(self, lsn: int) -> bool:
        """Whether the stream was read up to ``lsn`` and all of it delivered."""
        return self.received_lsn >= lsn and not self._pending and not self.in_transaction
