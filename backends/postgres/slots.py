"""Replication slots: the feed's checks and creation, and ``changefeed slots`` housekeeping.

A logical replication slot keeps every WAL segment its consumer has not confirmed. A feed that
is gone for good leaves a slot that fills the server's disk, so these are listed with how far
behind they are, and dropped together with their publication.

Every function takes an open connection or a URL; none holds state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.connection import session_options
from changefeed.backends.postgres.errors import (
    connect_failure,
    slot_creation_error,
    slot_in_use,
)
from changefeed.backends.postgres.names import SLOT_PREFIX
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    first_line,
)

log = logging.getLogger("changefeed.postgres")

RETAINED_WARNING_BYTES = 1 << 30
"""A feed warns at start when its slot keeps more WAL than this (see `changefeed slots`)."""
RELEASE_WAIT = 10.0
"""Seconds a feed's first connection waits for a slot another process streams from. A client
that died (a crash, kill -9) holds its slot until its walsender notices: at once when the
connection closes, seconds later on a busy server. A supervisor restarting a crashed feed at
once then finds the slot free instead of failing for good."""
RELEASE_POLL = 0.1


@dataclass
class Slot:
    """A replication slot as ``pg_replication_slots`` shows it."""

    name: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    wal_status: str | None
    retained_bytes: int | None


def get_slot(conn: psycopg.Connection, name: str) -> Slot | None:
    row = conn.execute(
        "SELECT slot_name, plugin, database, active, active_pid, wal_status,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        [name],
    ).fetchone()
    return Slot(*row) if row else None


def wait_until_released(
    conn: psycopg.Connection, slot: Slot, wait: float, stopping: Callable[[], bool],
) -> Slot | None:
    """``slot`` (active: the caller decides whether to wait) as it is once no process streams
    from it, asked every `RELEASE_POLL` seconds for at most ``wait`` seconds (or until
    ``stopping()``); still active if it stayed in use, None if it was dropped meanwhile."""
    log.warning("slot %s is in use by another process (pid %s): waiting up to %g s for it to"
                " be released", slot.name, slot.active_pid, wait)
    deadline = time.monotonic() + wait
    current: Slot | None = slot
    while current is not None and current.active and not stopping():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(RELEASE_POLL, remaining))
        current = get_slot(conn, slot.name)
    if current is None or not current.active:
        log.info("slot %s was released", slot.name)
    return current


def check_slot(
    conn: psycopg.Connection, slot: Slot | None, *, first_connection: bool, waited: float = 0.0,
) -> None:
    """Raise a clear error if the slot exists but cannot be used; on the feed's first
    connection, warn when it keeps much WAL."""
    if slot is None:
        return
    if slot.plugin != "pgoutput" or slot.database != conn.info.dbname:
        raise ConfigurationError(
            f"slot {slot.name} exists but is not a pgoutput slot of database"
            f" {conn.info.dbname!r}: choose another name with --slot"
        )
    if slot.wal_status == "lost":
        raise ResumeError(
            f"slot {slot.name} was invalidated: PostgreSQL removed WAL it still needed"
            f" (see max_slot_wal_keep_size); drop it (changefeed slots --drop {slot.name})"
            " and start again with --prefeed snapshot"
        )
    if slot.active:
        raise slot_in_use(slot.name, slot.active_pid, first_connection=first_connection,
                          waited=waited)
    if first_connection and (slot.retained_bytes or 0) > RETAINED_WARNING_BYTES:
        log.warning("slot %s keeps %s of WAL on the server: this feed is far behind",
                    slot.name, format_size(slot.retained_bytes or 0))


def slot_to_continue(
    conn: psycopg.Connection, name: str, slot: Slot | None, *, snapshot_pending: bool,
    known: bool,
) -> Slot | None:
    """``slot`` if the feed streams on from it; None if it is to be created: missing, or
    made with a snapshot prefeed that never completed (dropped here, to take it again).
    A slot that existed before (``known``) and is gone lost the changes since: ResumeError."""
    if slot is not None and snapshot_pending:
        log.warning("the snapshot of slot %s never completed: taking it again", name)
        conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
        return None
    if slot is None and known:
        raise ResumeError(
            f"slot {name} was dropped while the feed ran: the changes after its last"
            " position are gone; start again (with --prefeed snapshot to re-read the tables)"
        )
    return slot


def create_slot(repl: psycopg.Connection, name: str, *, export_snapshot: bool) -> str:
    """Create the pgoutput slot ``name`` on a replication connection; returns the name of its
    exported snapshot ("" without one)."""
    mode = "EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT"
    command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}").format(
        sql.Identifier(name), sql.SQL(mode)
    )
    try:
        row = repl.execute(command).fetchone()
    except psycopg.Error as exc:
        error = slot_creation_error(name, exc)
        if error is exc:
            raise
        raise error from exc
    assert row is not None
    _, consistent_point, snapshot_name, _ = row
    log.info("created replication slot %s at %s", name, consistent_point)
    return snapshot_name or ""


def confirmed_position(conn: psycopg.Connection, name: str) -> str | None:
    """The slot's confirmed position as text (``0/16B3748``), where a stream starts."""
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        [name],
    ).fetchone()
    return row[0] if row else None


def server_wal_position(conn: psycopg.Connection) -> int:
    """How far the server has written WAL (inserted, which a commit waits for; flushed a
    moment later under ``synchronous_commit = off``; replayed, on a standby): a walsender that
    reads up to there has everything committed until now. Right after a page header (where an
    insert position can point, no record can end) it is that page's start."""
    row = conn.execute(
        "SELECT CASE WHEN p % b <= 40 THEN p - p % b ELSE p END FROM (SELECT"
        " (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        "  ELSE pg_current_wal_insert_lsn() END - '0/0')::bigint AS p,"
        " current_setting('wal_block_size')::bigint AS b) AS wal"
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def advance_slot(dsn: str, name: str, lsn: str, *, wait: float = 5.0) -> None:
    """Confirm ``lsn`` on the slot without streaming (``pg_replication_slot_advance``): an
    acknowledgement that came after the stream closed. The feed's walsender may still be
    exiting for a moment, keeping the slot busy: try for ``wait`` seconds, then warn."""
    deadline = time.monotonic() + wait
    error: Exception
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                             options=session_options(dsn)) as conn:
            while True:
                try:
                    conn.execute(
                        "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", [name, lsn]
                    )
                    return
                except psycopg.errors.ObjectInUse:  # our walsender has not gone yet
                    if time.monotonic() >= deadline:
                        error = TimeoutError("the slot stayed in use")
                        break
                    time.sleep(0.05)
    except psycopg.Error as exc:
        error = exc
    log.warning(
        "could not record the last acknowledgement (%s) on slot %s: %s; the changes"
        " after the slot's position will come again", lsn, name, first_line(error),
    )


def format_size(count: int) -> str:
    """A byte count for people: ``100 bytes``, ``1.5 GB``."""
    value = float(count)
    for unit in ("bytes", "kB", "MB"):
        if value < 1024:
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


@dataclass(frozen=True)
class SlotInfo:
    """One changefeed slot as ``pg_replication_slots`` shows it, with its publication."""

    name: str
    active: bool
    confirmed_lsn: str | None
    behind_bytes: int | None
    """WAL written since the last confirmed change (how far the feed is behind)."""
    wal_status: str | None
    tables: tuple[str, ...]
    retained_bytes: int | None = None
    """WAL the server keeps for this slot (from ``restart_lsn``): disk it cannot free."""
    publication: str | None = None
    named: bool = False
    """Made with an explicit ``--slot`` name (found through its publication's record)."""


def connect(url: str) -> psycopg.Connection:
    """A plain connection for the housekeeping commands; failures as one clear line."""
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10,
                               options=session_options(url))
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise PermanentBackendError(connect_failure(exc, url)) from exc


def list_slots(url: str) -> list[SlotInfo]:
    """Every slot changefeed made in the URL's database (default names and ``--slot`` ones),
    with its lag, the WAL it retains and its published tables."""
    with connect(url) as conn:
        owners = {
            publication.meta.get("slot"): publication
            for publication in catalog.changefeed_publications(conn)
        }
        rows = conn.execute(
            "SELECT s.slot_name, s.active, s.confirmed_flush_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,"
            " s.wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint"
            " FROM pg_replication_slots s"
            " WHERE s.database = current_database() AND s.plugin = 'pgoutput' ORDER BY 1"
        ).fetchall()
        slots = []
        for name, active, confirmed, behind, wal_status, retained in rows:
            owner = owners.get(name)
            if owner is None and not name.startswith(SLOT_PREFIX):
                continue  # not one of ours
            publication = owner.name if owner is not None else name
            tables = tuple(row[0] for row in conn.execute(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables"
                " WHERE pubname = %s ORDER BY 1", [publication]))
            slots.append(SlotInfo(
                name, active, confirmed, behind, wal_status, tables, retained, publication,
                named=owner is not None and not owner.meta.get("default", True),
            ))
    return slots


def drop_slots(url: str, names: list[str], *, inactive: bool = False) -> list[str]:
    """Drop the named slots (and ``inactive`` ones) with their publications; returns names."""
    with connect(url) as conn:
        existing = {info.name: info for info in list_slots(url)}
        targets = list(names)
        if inactive:
            targets += [name for name, info in existing.items() if not info.active]
        dropped = []
        for name in dict.fromkeys(targets):
            info = existing.get(name)
            if info is None:
                raise ConfigurationError(f"no changefeed slot named {name!r} in this database")
            if info.active:
                raise PermanentBackendError(f"slot {name} is in use: stop its feed first")
            conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
            catalog.drop_publication(conn, info.publication or name)
            dropped.append(name)
        return dropped
