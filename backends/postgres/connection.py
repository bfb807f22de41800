"""Connecting to PostgreSQL and checking the server, before a feed touches anything.

`connect` (a bad URL, a server that is down), `check_server` (wal_level), `check_messages`
(messages need 14+), `connect_replication` (the REPLICATION privilege, free WAL senders). Every
connection's session reads values as the loaders expect them (`values.SESSION_SETTINGS`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from changefeed.backends.postgres.errors import connection_error, replication_refused
from changefeed.backends.postgres.values import SESSION_SETTINGS
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    TransientBackendError,
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


def _identifier(name: str, conn: psycopg.Connection) -> str:
    """``name`` as SQL text, quoted only where PostgreSQL needs it."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return sql.Identifier(name).as_string(conn)


