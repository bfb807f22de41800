"""What a feed checks and prepares on the server before it streams, as functions of a connection.

The order matters, so that a mistake ends with one clear line before anything is changed:
`connect` (a bad URL, a server that is down), `check_server` (wal_level), the tables
(`catalog.resolve_tables`), `choose_names` (continue the slot that already serves these
tables), `connect_replication` (the REPLICATION privilege, free WAL senders), the slot's state
(`slots.check_slot`), and last `ensure_publication`, the only step that writes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from changefeed.backends.postgres import catalog, slots
from changefeed.backends.postgres.errors import connection_error, replication_refused
from changefeed.backends.postgres.names import TableName
from changefeed.backends.postgres.protocol import format_lsn, parse_lsn
from changefeed.backends.postgres.values import SESSION_SETTINGS
from changefeed.change import Operation
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    TransientBackendError,
    first_line,
)

log = logging.getLogger("changefeed.postgres")

MESSAGES_VERSION = 140000
"""pgoutput streams logical decoding messages from PostgreSQL 14 on."""


def conninfo(connection: Any) -> str:
    """The connection string of a feed's ``connection``: a URL or conninfo string as given,
    a psycopg connection's parameters (password included), or "" for libpq's defaults
    (PGHOST, PGDATABASE, ...)."""
    if isinstance(connection, str):
        return connection
    if isinstance(connection, psycopg.Connection):
        params = connection.info.get_parameters()
        password = connection.pgconn.password
        if password:
            params["password"] = password.decode()
        return psycopg.conninfo.make_conninfo(**params)
    if connection is None:
        return ""
    raise ConfigurationError(f"cannot use a {type(connection).__name__} as a PostgreSQL connection")


def connect(dsn: str, *, replication: bool = False) -> psycopg.Connection:
    """An autocommit connection whose sessions read values as the loaders expect them
    (`values.SESSION_SETTINGS`: UTC, fixed date and number formats).

    Raises `ConfigurationError` for a bad URL and `TransientBackendError` for a connection
    the server refused or that never got through (the feed decides whether to retry)."""
    options: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in dsn:
        options["connect_timeout"] = 10
    if replication:
        options["replication"] = "database"
    try:
        conn = psycopg.connect(dsn, **options)
        conn.execute(SESSION_SETTINGS)
        return conn
    except (psycopg.ProgrammingError, psycopg.OperationalError) as exc:
        raise connection_error(exc, dsn) from exc


def connect_replication(dsn: str, conn: psycopg.Connection) -> psycopg.Connection:
    """The replication connection; when the server refuses it, say why from the catalog,
    read on the plain connection ``conn``."""
    try:
        return connect(dsn, replication=True)
    except TransientBackendError as exc:
        may_replicate, user, senders, max_senders = conn.execute(
            "SELECT r.rolreplication OR r.rolsuper, current_user,"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'),"
            " current_setting('max_wal_senders')::int"
            " FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone() or (True, "?", 0, 1)
        error = replication_refused(may_replicate, user, _identifier(user, conn), senders,
                                    max_senders)
        if error is None:
            raise
        raise error from (exc.__cause__ or exc)


def check_server(conn: psycopg.Connection) -> int:
    """Refuse a server whose wal_level is not logical; returns its version number."""
    (wal_level,) = conn.execute("SHOW wal_level").fetchone() or ("?",)
    if wal_level != "logical":
        raise PermanentBackendError(
            f"wal_level is {wal_level!r} but logical replication needs 'logical': run"
            " ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )
    return conn.info.server_version


def check_messages(conn: psycopg.Connection, prefixes: Sequence[str]) -> None:
    """Streaming messages needs pgoutput's messages option (PostgreSQL 14 or later)."""
    version = conn.info.server_version
    if prefixes and version < MESSAGES_VERSION:
        raise ConfigurationError(
            f"messages need PostgreSQL 14 or later (pgoutput's messages option); this"
            f" server is {version // 10000}.{version % 10000}"
        )


def dropped_tables(conn: psycopg.Connection, oids: Sequence[int]) -> tuple[list[int], int]:
    """The tables among ``oids`` that no longer exist, and the server's WAL position now:
    every change of theirs was written before it."""
    found = catalog.tables_by_oid(conn, oids)
    gone = [oid for oid in oids if oid not in found]
    if not gone:
        return [], 0
    (lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("0/0",)
    return gone, parse_lsn(lsn)


def choose_names(
    conn: psycopg.Connection, slot: str, tables: Sequence[catalog.Table], legacy_name: str
) -> tuple[str, str] | None:
    """For a feed with default names whose ``slot`` does not exist: the (slot, publication)
    with default names that already serves ``tables``, found by OID (a table renamed since
    keeps its slot), or the slot an earlier version named ``legacy_name``; else None."""
    if slots.get_slot(conn, slot) is not None:
        return None
    found = catalog.find_default_slot(conn, tables, [legacy_name])
    if found is None or found[0] == slot:
        return None
    log.warning("continuing slot %s, which streams %s (under an earlier name)",
                found[0], ", ".join(t.qualified for t in tables))
    return found


@dataclass
class PublicationSetup:
    """What `ensure_publication` did."""

    meta: dict[str, Any]
    """changefeed's record on the publication (see `catalog`), as written."""
    created: bool
    """The publication was created now (drop it if the feed never starts)."""


def ensure_publication(
    conn: psycopg.Connection, name: str, tables: Sequence[catalog.Table], *, slot: str,
    operation: Operation, default_names: bool, backfill_added: bool,
) -> PublicationSetup:
    """Create the publication or bring it to the feed's tables and operations.

    Refuses, before changing anything, tables whose UPDATE/DELETE would then fail and a
    publication that serves other tables or another slot. The slot's own publication follows
    the feed's list of tables; with ``backfill_added``, each added table is recorded as to be
    back-filled while the others stream on.
    """
    qualified = ", ".join(t.qualified for t in tables)
    publication = catalog.get_publication(conn, name)
    if publication is not None:
        catalog.check_publication(conn, publication, tables, slot, operation)
    catalog.check_slot_owner(conn, slot, name, tables)
    catalog.check_replica_identity(conn, tables, operation)
    meta = dict(publication.meta) if publication is not None else {}
    if meta.get("slot", slot) == slot:  # the record is of the slot that made it
        meta.update(slot=slot, default=default_names,
                    tables={str(t.oid): t.qualified for t in tables})
    try:
        if publication is None:
            catalog.create_publication(conn, name, tables, operation, meta)
            log.info("created publication %s for %s (%s)", name, qualified,
                     ", ".join(operation.names))
        else:
            catalog.update_publication(conn, publication, operation)
            if publication.table_oids != {t.oid for t in tables}:
                _change_tables(conn, publication, tables, meta, slot, backfill_added)
            if meta != publication.meta:
                catalog.write_meta(conn, name, meta)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PermanentBackendError(
            f"cannot set up publication {name}: {first_line(exc)}; the tables' owner can run:"
            f" CREATE PUBLICATION {name} FOR TABLE {qualified} WITH (publish ="
            f" '{', '.join(operation.names)}', publish_via_partition_root = true)"
        ) from exc
    return PublicationSetup(meta, publication is None)


def _change_tables(
    conn: psycopg.Connection, publication: catalog.Publication,
    tables: Sequence[catalog.Table], meta: dict[str, Any], slot: str, backfill_added: bool,
) -> None:
    added, removed = catalog.set_publication_tables(conn, publication, tables)
    states = dict(meta.get("backfill") or {})
    for oid in removed:
        states.pop(str(oid), None)
    for table in added:
        if backfill_added:
            states[str(table.oid)] = {"after": None, "done": 0, "chunks": 0}
    meta["backfill"] = states
    if added:
        log.warning("slot %s now also streams %s%s", slot,
                    ", ".join(t.qualified for t in added),
                    " (back-filled first)" if backfill_added else "")
    if removed:
        log.warning("slot %s no longer streams %s", slot, catalog.describe_oids(conn, removed))


def _identifier(name: str, conn: psycopg.Connection) -> str:
    """``name`` as SQL text, quoted only where PostgreSQL needs it."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return sql.Identifier(name).as_string(conn)


class WatchedTables:
    """The feed's tables by OID: resolved once by name, then followed by OID (a rename keeps
    the table; the stream tells its new name), and noted when dropped."""

    def __init__(self) -> None:
        self.by_oid: dict[int, catalog.Table] = {}
        self.stream_names: dict[int, str] = {}
        """OID -> the name the stream last gave the table (what its changes carry)."""
        self.dropped: dict[int, tuple[str, int]] = {}
        """OID -> (name, the WAL position at which the table was seen gone)."""

    def check(
        self, conn: psycopg.Connection, names: Sequence[TableName],
        exclude: Sequence[TableName],
    ) -> None:
        """Resolve ``names`` on the first call; afterwards note the tables dropped since."""
        if self.by_oid:
            self.note_dropped(conn)
            return
        resolved = catalog.resolve_tables(conn, names, exclude)
        self.by_oid = {table.oid: table for table in resolved}
        self.stream_names = {table.oid: table.qualified for table in resolved}

    def note_dropped(self, conn: psycopg.Connection) -> None:
        """Note tables that no longer exist, and the WAL position at which they were seen
        gone: the feed delivers every change up to there, then ends."""
        watched = [oid for oid in self.by_oid if oid not in self.dropped]
        gone, lsn = dropped_tables(conn, watched)
        for oid in gone:
            name = self.name_of(oid)
            self.dropped[oid] = (name, lsn)
            log.warning("table %s was dropped: delivering its changes up to %s, then stopping",
                        name, format_lsn(lsn))

    @property
    def dropped_until(self) -> int:
        """The WAL position up to which the dropped tables' changes are delivered."""
        return max(lsn for _, lsn in self.dropped.values())

    def dropped_error(self, slot: str) -> PermanentBackendError:
        """The end of a feed whose dropped tables' changes were all delivered."""
        names = ", ".join(sorted(name for name, _ in self.dropped.values()))
        return PermanentBackendError(
            f"table {names} was dropped: every change before the drop was delivered;"
            f" drop the feed's slot (changefeed slots --drop {slot}) if it is not"
            " needed any more"
        )

    def name_of(self, oid: int) -> str:
        return self.stream_names.get(oid) or self.by_oid[oid].qualified

    def live(self) -> list[catalog.Table]:
        """The tables not dropped."""
        return [table for oid, table in self.by_oid.items() if oid not in self.dropped]
