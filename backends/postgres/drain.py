"""The drain gate: wait until a slot's consumer has delivered everything committed so far.

Before a deploy ships a migration that old code or old notifications cannot survive, the
deployer must know that nothing written under the old schema is still waiting to be processed.
pgpubsub answers with a ``db_version`` on each stored notification; with logical replication the
answer is exact: read the server's WAL position once (`drain_target`: every transaction
committed before that read ends at or before it, asynchronous commits included), then wait
until the slot's confirmed position (what its consumer acknowledged as delivered) reaches it.

`DrainState` and `describe` are pure; `wait_for_drain` polls the server.

A consumer confirms only what it delivered, and an idle feed confirms the server's position
when nothing is pending, so a running consumer drains within a second or two of catching up; a
stopped one never does, and the gate times out saying how far behind the slot is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from changefeed.backends.postgres.protocol import format_lsn, parse_lsn
from changefeed.backends.postgres.slots import connect, format_size
from changefeed.errors import (
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    first_line,
)


class DrainTimeout(ChangefeedError):
    """The slot did not pass the target position in time."""

    exit_code = 1


@dataclass(frozen=True)
class DrainState:
    """Where a slot stands against the WAL position read when the gate started."""

    slot: str
    target: int
    confirmed: int | None
    active: bool
    elapsed: float = 0.0

    @property
    def drained(self) -> bool:
        """Everything committed before the target was delivered and acknowledged."""
        return self.confirmed is not None and self.confirmed >= self.target

    @property
    def behind(self) -> int:
        """Bytes of WAL between the confirmed position and the target (0 once drained)."""
        return max(0, self.target - (self.confirmed or 0))


def describe(state: DrainState) -> str:
    """One line for people: ``slot s: 1.2 kB behind 0/16B5000 (confirmed 0/16B4B00, active)``."""
    confirmed = format_lsn(state.confirmed) if state.confirmed is not None else "none"
    if state.drained:
        return (f"slot {state.slot} is drained: confirmed {confirmed} has passed"
                f" {format_lsn(state.target)}")
    running = "its consumer is running" if state.active else "no consumer is running"
    return (f"slot {state.slot} is {format_size(state.behind)} behind {format_lsn(state.target)}"
            f" (confirmed {confirmed}; {running})")


def timeout_message(state: DrainState) -> str:
    """The error of a gate that timed out."""
    hint = "" if state.active else ": start its consumer so that it can catch up"
    return f"not drained after {state.elapsed:.0f} s: {describe(state)}{hint}"


def drain(
    url: str,
    slot: str,
    *,
    timeout: float,
    report: Callable[[DrainState], None] | None = None,
) -> DrainState:
    """`wait_for_drain` on a connection to ``url`` (connection errors as one clear line)."""
    try:
        with connect(url) as conn:
            return wait_for_drain(conn, slot, timeout=timeout, report=report)
    except psycopg.Error as exc:  # e.g. a standby (no WAL position of its own), a lost server
        raise PermanentBackendError(f"cannot check slot {slot}: {first_line(exc)}") from exc


def wait_for_drain(
    conn: psycopg.Connection,
    slot: str,
    *,
    timeout: float,
    report: Callable[[DrainState], None] | None = None,
    report_every: float = 2.0,
    poll: float = 0.2,
) -> DrainState:
    """Wait until ``slot`` has confirmed the WAL position read at the start.

    Returns the drained state; raises `DrainTimeout` after ``timeout`` seconds,
    `ConfigurationError` for an unknown or physical slot, `ResumeError` for an invalidated one.
    ``report`` is called with the state every ``report_every`` seconds while waiting.
    """
    started = time.monotonic()
    target_lsn = drain_target(conn)
    last_report = started
    while True:
        state = _state(conn, slot, target_lsn, time.monotonic() - started)
        if state.drained:
            return state
        now = time.monotonic()
        if now - started >= timeout:
            raise DrainTimeout(timeout_message(state))
        if report is not None and now - last_report >= report_every:
            last_report = now
            report(state)
        time.sleep(min(poll, max(0.0, started + timeout - now)))


SHORT_PAGE_HEADER = 24
LONG_PAGE_HEADER = 40
"""The sizes of a WAL page's header (``SizeOfXLogShortPHD``, ``SizeOfXLogLongPHD``)."""


def drain_target(conn: psycopg.Connection) -> int:
    """A WAL position that every transaction committed so far ends at or before.

    The insert position, not the write position (``pg_current_wal_lsn()``): an asynchronous
    commit (``synchronous_commit = off``) returns before its commit record is written, and a
    gate reading the write position opened with such changes undelivered. At the start of a
    page the insert position lies past the page header no record has filled yet; the last
    record ended at the page boundary, which is then the target (the WAL written, and a
    caught-up consumer's confirmation, go no further until the next record)."""
    insert, block, segment = conn.execute(
        "SELECT pg_current_wal_insert_lsn()::text, current_setting('wal_block_size')::int,"
        " pg_size_bytes(current_setting('wal_segment_size'))"
    ).fetchone() or ("0/0", 8192, 16 << 20)
    return without_page_header(parse_lsn(insert), block, segment)


def without_page_header(lsn: int, block: int, segment: int) -> int:
    """``lsn`` less the page header it lies just past, if it does (the long header of a
    segment's first page, 40 bytes, or a page's short one, 24)."""
    header = LONG_PAGE_HEADER if lsn % segment == LONG_PAGE_HEADER else SHORT_PAGE_HEADER
    return lsn - header if lsn % block == header else lsn


def _state(conn: psycopg.Connection, slot: str, target: int, elapsed: float) -> DrainState:
    row = conn.execute(
        "SELECT slot_type, confirmed_flush_lsn::text, active, wal_status"
        " FROM pg_replication_slots WHERE slot_name = %s",
        [slot],
    ).fetchone()
    if row is None:
        raise ConfigurationError(
            f"no replication slot named {slot!r} on this server (changefeed slots lists them)"
        )
    slot_type, confirmed, active, wal_status = row
    if slot_type != "logical":
        raise ConfigurationError(f"slot {slot} is a {slot_type} slot: drain checks logical ones")
    if wal_status == "lost":
        raise ResumeError(f"slot {slot} was invalidated (PostgreSQL removed WAL it needed):"
                          " what it had not delivered is gone")
    confirmed_lsn = parse_lsn(confirmed) if confirmed else None
    return DrainState(slot, target, confirmed_lsn, bool(active), elapsed)


