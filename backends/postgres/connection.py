"""Connecting to PostgreSQL and checking the server, before a feed touches anything.

`connect` (a bad URL, a server that is down), `check_server` (wal_level), `check_messages`
(messages need 14+), `connect_replication` (the REPLICATION privilege, free WAL senders). Every
connection's session reads values as the loaders expect them (`values.SESSION_SETTINGS`), and
sets what the feed's work needs whatever the database's defaults (`SESSION_LIMITS`): a
``statement_timeout`` of 20 ms set on the database would otherwise cancel every snapshot
chunk, an ``idle_in_transaction_session_timeout`` end an exported snapshot's read, and
``default_transaction_read_only`` refuse the watermarks.
"""

from __future__ import annotations

import logging
import os
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

SESSION_LIMITS = {
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "default_transaction_read_only": "off",
    "default_transaction_isolation": "read committed",
}
"""Settings of every connection a feed opens (plain, replication, snapshot readers): no
statement, lock or idle-in-transaction timeout (a chunk, a snapshot read or a catalog change
may take longer than the application's statements), writes allowed, READ COMMITTED. Sent at
connection start, so they hold from the first statement and override the database's and the
role's defaults; options in the URL come after them and win."""
NEWER_LIMITS = ("idle_session_timeout", "transaction_timeout")
"""Settings of later versions (14, 17), set to 0 where the server has them."""


def session_options(dsn: str) -> str:
    """libpq ``options`` for a feed's connection to ``dsn``: `SESSION_LIMITS`, then the
    URL's own options (or ``PGOPTIONS``)."""
    ours = " ".join(f"-c {name}={value.replace(' ', chr(92) + ' ')}"
                    for name, value in SESSION_LIMITS.items())
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn).get("options")
    except psycopg.ProgrammingError:
        given = None  # a bad URL: connecting says so
    if given is None:
        given = os.environ.get("PGOPTIONS")
    return f"{ours} {given}" if given else ours


def set_newer_limits(conn: psycopg.Connection) -> None:
    """Set `NEWER_LIMITS` to 0 where the server knows them (no error where it does not)."""
    names = ", ".join(f"'{name}'" for name in NEWER_LIMITS)
    # Without parameters: a replication connection takes none.
    conn.execute(f"SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN ({names})")


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
    (`values.SESSION_SETTINGS`: UTC, fixed date and number formats), with `SESSION_LIMITS`.

    Raises `ConfigurationError` for a bad URL and `TransientBackendError` for a connection
    the server refused or that never got through (the feed decides whether to retry)."""
    options: dict[str, Any] = {"autocommit": True, "options": session_options(dsn)}
    if "connect_timeout" not in dsn:
        options["connect_timeout"] = 10
    if replication:
        options["replication"] = "database"
    try:
        conn = psycopg.connect(dsn, **options)
        conn.execute(SESSION_SETTINGS)
        set_newer_limits(conn)
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


