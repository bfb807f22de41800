"""What a PostgreSQL failure means for the feed: pure classification, no I/O.

The server says what went wrong with a SQLSTATE, and psycopg raises one exception class per
SQLSTATE, so errors are classified by class (or by the code, where only a result carries it),
never by message text, which the server may translate. Two kinds of failure carry no SQLSTATE
at all, both from libpq on the client side: a connection string it cannot parse, and a
connection it could not make; those are told apart by the only thing libpq gives, its text.

`is_transient` is the feed's retry predicate; the other functions turn a failure into the
changefeed error whose message says what to do.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import errors as sqlstate

from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    TransientBackendError,
    first_line,
)

OBJECT_IN_USE = "55006"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
UNDEFINED_OBJECT = "42704"

_SHUTDOWN = (sqlstate.AdminShutdown, sqlstate.CrashShutdown, sqlstate.CannotConnectNow)


def is_transient(exc: BaseException) -> bool:
    """Whether reconnecting may cure ``exc``: a lost connection, a server shutting down or
    starting, a terminated walsender; not a slot that cannot be used any more (55000)."""
    if isinstance(exc, (TransientBackendError, *_SHUTDOWN)):
        return True
    return isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, sqlstate.ObjectNotInPrerequisiteState
    )


def is_bad_url(exc: psycopg.Error) -> bool:
    """Whether libpq refused the connection string itself (no server involved, no SQLSTATE)."""
    if isinstance(exc, psycopg.ProgrammingError):
        return True
    text = str(exc)
    return isinstance(exc, psycopg.OperationalError) and (
        "connection option" in text or "invalid URI" in text
    )


def connect_failure(exc: BaseException, dsn: str) -> str:
    """One line for a connection libpq could not make: where, and the last reason."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        params = {}
    where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
    # libpq says 'connection to server at "h" (addr), port p failed: <reason>' for every
    # address it tried, each followed by hints; the reason of the last attempt is enough.
    reasons = re.findall(r"failed: (.+)", str(exc)) or [first_line(exc)]
    return f"cannot connect to PostgreSQL at {where}: {reasons[-1].strip()}"


def connection_error(exc: psycopg.Error, dsn: str) -> Exception:
    """The error for a failed ``psycopg.connect``: a bad URL is the caller's to fix; a refused
    connection may be a server restarting (the feed decides, by whether it ever got through)."""
    if is_bad_url(exc):
        return ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}")
    return TransientBackendError(connect_failure(exc, dsn))


def replication_refused(
    may_replicate: bool, user: str, user_sql: str, senders: int, max_senders: int
) -> Exception | None:
    """Why the server refused a replication connection that a plain one got through, from
    the catalog (a refused connection has no SQLSTATE, and its text is localised); None when
    the catalog does not tell."""
    if not may_replicate:
        return PermanentBackendError(
            f"role {user!r} lacks the REPLICATION privilege: as a superuser run"
            f" ALTER ROLE {user_sql} REPLICATION"
        )
    if senders >= max_senders:
        return TransientBackendError(
            f"all {max_senders} WAL senders of the server are in use: raise max_wal_senders"
            " (and max_replication_slots) and restart PostgreSQL, or stop feeds that are not"
            " needed (changefeed slots)"
        )
    return None


def slot_in_use(slot: str, pid: int | None, *, first_connection: bool) -> Exception:
    """The slot is streaming to another process: on the feed's first connection someone
    else's; on a reconnect most likely our own previous walsender, still ending."""
    message = f"slot {slot} is in use by another process (pid {pid})"
    if first_connection:
        return PermanentBackendError(message + ": stop it, or use another --slot")
    return TransientBackendError(message)


def slot_creation_error(slot: str, exc: psycopg.Error) -> Exception:
    """The error for a failed CREATE_REPLICATION_SLOT."""
    if isinstance(exc, sqlstate.DuplicateObject):
        return TransientBackendError(f"slot {slot} was created meanwhile")
    if isinstance(exc, sqlstate.ConfigurationLimitExceeded):  # no free slot
        return PermanentBackendError(
            f"cannot create slot {slot}: {first_line(exc)}: raise max_replication_slots (and"
            " max_wal_senders) and restart PostgreSQL, or drop unused slots (changefeed slots"
            " --drop-inactive)"
        )
    return exc


def start_replication_error(slot: str, code: str, message: str) -> Exception:
    """The error for a refused START_REPLICATION, by its SQLSTATE ``code``."""
    if code == OBJECT_IN_USE:  # our previous walsender may still be ending
        return TransientBackendError(f"slot {slot}: {message}")
    if code == OBJECT_NOT_IN_PREREQUISITE_STATE:  # invalidated: the WAL it needs is gone
        return ResumeError(
            f"slot {slot} was invalidated ({message}); drop it"
            f" (changefeed slots --drop {slot}) and start again with --prefeed snapshot"
        )
    if code == UNDEFINED_OBJECT:  # the slot (or publication) is gone: the setup tells why
        return TransientBackendError(f"slot {slot}: {message}")
    return psycopg.OperationalError(message or "START_REPLICATION failed")


def stream_ended(message: str) -> Exception:
    """The server ended the replication stream (a walsender terminated, a shutdown): the
    feed reconnects and resumes from the slot."""
    return psycopg.OperationalError(message or "the server ended the replication stream")


def text(message: str | bytes | None) -> str:
    """libpq's messages come as bytes or str depending on the call: one stripped str."""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    return (message or "").strip()
