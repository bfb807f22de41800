"""Housekeeping for the slots and publications changefeed creates (``changefeed slots``).

A logical replication slot keeps every WAL segment its consumer has not confirmed. A feed that
is gone for good leaves a slot that fills the server's disk, so these are listed with how far
behind they are, and dropped together with their publication.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.feed import _connect_failure
from changefeed.backends.postgres.names import SLOT_PREFIX
from changefeed.errors import ConfigurationError, PermanentBackendError, first_line


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


def _connect(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise PermanentBackendError(_connect_failure(exc, url)) from exc


def list_slots(url: str) -> list[SlotInfo]:
    """Every slot changefeed made in the URL's database (default names and ``--slot`` ones),
    with its lag, the WAL it retains and its published tables."""
    with _connect(url) as conn:
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
            catalog.drop_publication(conn, info.publication or name)
            dropped.append(name)
        return dropped
