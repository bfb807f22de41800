"""The replication protocol's framing around pgoutput: pure functions of bytes, no I/O.

After ``START_REPLICATION`` the server sends CopyData messages of two kinds:

* ``w`` XLogData: a 24-byte header (WAL start, WAL end, send time) and one pgoutput message,
  which `changefeed.backends.postgres.pgoutput` decodes;
* ``k`` primary keepalive: WAL end, send time, and whether the server wants a reply now.

The client answers with ``r`` standby status updates: how far it has written, flushed and
applied the stream. For a logical slot the flush position is what the slot confirms (and the
server may then recycle the WAL before it), so it must only ever be a position whose changes
were delivered (see `changefeed.backends.postgres.ledger`).

LSNs are 64-bit WAL positions, written ``16/B374D848`` by PostgreSQL. Protocol timestamps
count microseconds since 2000-01-01 UTC, PostgreSQL's epoch.
"""

from __future__ import annotations

import struct
from datetime import datetime, timedelta, timezone

XLOGDATA = 119  # b"w"
KEEPALIVE = 107  # b"k"
XLOGDATA_HEADER_SIZE = 25
"""The kind byte and the header before an XLogData message's pgoutput payload."""

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
PG_EPOCH_OFFSET_US = 946_684_800_000_000
"""PostgreSQL's epoch (2000-01-01) in Unix microseconds."""

_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!QqB")
_STANDBY_STATUS = struct.Struct("!cQQQqB")


def xlogdata_header(message: bytes | memoryview) -> tuple[int, int, int]:
    """(WAL start, WAL end, send time) of an XLogData message (kind byte included)."""
    start, wal_end, sent_at = _XLOGDATA.unpack_from(message, 1)
    return start, wal_end, sent_at


def keepalive(message: bytes | memoryview) -> tuple[int, int, bool]:
    """(WAL end, send time, reply requested) of a primary keepalive (kind byte included)."""
    wal_end, sent_at, reply = _KEEPALIVE.unpack_from(message, 1)
    return wal_end, sent_at, bool(reply)


def standby_status(
    written: int, flushed: int, *, unix_time: float, reply: bool = False
) -> bytes:
    """A standby status update: received up to ``written``, delivered up to ``flushed`` (also
    sent as applied; 0 tells the server nothing about delivery), at ``unix_time`` seconds;
    ``reply`` asks the server for a keepalive saying how far its WAL goes."""
    now_us = int(unix_time * 1_000_000) - PG_EPOCH_OFFSET_US
    return _STANDBY_STATUS.pack(b"r", written, flushed, flushed, now_us, int(reply))


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL writes it: ``16/B374D848``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """An LSN from PostgreSQL's ``16/B374D848`` form."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def pg_timestamp(microseconds: int) -> datetime:
    """A protocol timestamp (microseconds since 2000-01-01 UTC) as a datetime."""
    return PG_EPOCH + timedelta(0, 0, microseconds)  # positional: half the cost of a keyword
