"""Housekeeping for the slots and publications changefeed creates (``changefeed slots``).

A logical replication slot keeps every WAL segment its consumer has not confirmed. A feed that
is gone for good leaves a slot that fills the server's disk, so these are listed with how far
behind they are, and dropped together with their publication.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from changefeed.backends.postgres.feed import _connect_failure
from changefeed.backends.postgres.names import SLOT_PREFIX
from changefeed.errors import ConfigurationError, PermanentBackendError, first_line


@dataclass(frozen=True)
class SlotInfo:
    """One changefeed slot as ``pg_replication_slots`` shows it."""

    name: str
    active: bool
    confirmed_lsn: str | None
    behind_bytes: int | None
    wal_status: str | None
    tables: tuple[str, ...]


def _connect(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise PermanentBackendError(_connect_failure(exc, url)) from exc


def list_slots(url: str) -> list[SlotInfo]:
    """The changefeed slots of the URL's database, with their lag and published tables."""
    with _connect(url) as conn:
        rows = conn.execute(
            "SELECT s.slot_name, s.active, s.confirmed_flush_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,"
            " s.wal_status,"
            " coalesce((SELECT array_agg(t.schemaname || '.' || t.tablename ORDER BY 1)"
            "           FROM pg_publication_tables t WHERE t.pubname = s.slot_name), '{}')"
            " FROM pg_replication_slots s"
            " WHERE s.slot_name LIKE %s AND s.database = current_database() ORDER BY 1",
            [SLOT_PREFIX + "%"],
        ).fetchall()
    return [SlotInfo(r[0], r[1], r[2], r[3], r[4], tuple(r[5])) for r in rows]


def drop_slots(url: str, names: list[str], *, inactive: bool = False) -> list[str]:
    """Drop the named slots (and ``inactive`` ones) with their publications; returns names."""
    with _connect(url) as conn:
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
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
            dropped.append(name)
        return dropped
