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

TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
"""SQLSTATE classes that a new connection may not meet again: connection exceptions (08),
transaction rollbacks such as deadlocks (40), resources running out (53: disk full, out of
memory, too many connections), operator intervention (57: shutdown, restart, terminated or
cancelled backend) and system errors (58: I/O)."""
TRANSIENT_CODES = frozenset({OBJECT_IN_USE, "55P03"})
"""Codes of other classes that heal by waiting: an object in use, a lock not available."""
PERMANENT_CODES = frozenset({"53400", "57P04", "58P01", "58P02"})
"""Codes of transient classes that do not: a configuration limit (max_replication_slots), a
database dropped, a file missing (WAL removed) or duplicated."""


def sqlstate_is_transient(code: str) -> bool:
    """Whether the server will likely not say ``code`` again on a new connection: the codes of
    `TRANSIENT_CLASSES` and `TRANSIENT_CODES`, except `PERMANENT_CODES`. Every other class is
    the same on every retry: syntax errors and undefined objects (42), invalid values (22),
    authorization (28), features not supported (0A), program limits (54), objects in the
    wrong state (55000: an invalidated slot), internal errors (XX)..."""
    if code in PERMANENT_CODES:
        return False
    return code[:2] in TRANSIENT_CLASSES or code in TRANSIENT_CODES


def is_transient(exc: BaseException) -> bool:
    """Whether reconnecting may cure ``exc``: a lost connection, a server shutting down or
    starting, a terminated walsender, a deadlock, a full disk (`sqlstate_is_transient`);
    judged by the SQLSTATE the server sent. A failure without one is libpq's (a lost or
    refused connection): transient."""
    if isinstance(exc, TransientBackendError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    code = exc.sqlstate
    if code is None:
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate_is_transient(code)


def server_error(code: str | None, message: str) -> psycopg.Error:
    """The psycopg error of SQLSTATE ``code`` (the class psycopg raises for it) with
    ``message``, for failures read off the replication protocol, where psycopg raises
    nothing itself; without a code, a lost connection (`psycopg.OperationalError`)."""
    if not code:
        return psycopg.OperationalError(message)
    try:
        error = sqlstate.lookup(code)(message)
    except KeyError:  # a code psycopg has no class for: its class's base
        error = sqlstate.get_base_exception(code)(message)
        error.sqlstate = code
    return error


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


_REFUSED_FOR_GOOD = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry"
    r"|pg_hba\.conf rejects|role \".*\" does not exist|database \".*\" does not exist"
    r"|is not permitted to log in|permission denied for database"
    r"|is not currently accepting connections|does not support SSL|certificate"
)
"""What the server (or libpq) says, in PostgreSQL's English words, when it refuses a login for a
reason that trying again cannot change: authentication, a role or database that does not exist,
no permission to connect, TLS that cannot work. libpq gives a refused connection no SQLSTATE,
only this text; a server that answers in another language (``lc_messages``) is retried as a
connection that did not get through."""


def connection_error(exc: psycopg.Error, dsn: str) -> Exception:
    """The error for a failed ``psycopg.connect``: a bad URL is the caller's to fix; a login the
    server refuses for good (`_REFUSED_FOR_GOOD`: a wrong password, a role or database dropped,
    CONNECT revoked) is permanent; any other refused connection may be a server restarting
    (the feed decides, by whether it ever got through)."""
    if is_bad_url(exc):
        return ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}")
    if _REFUSED_FOR_GOOD.search(str(exc)):
        return PermanentBackendError(connect_failure(exc, dsn))
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


def slot_in_use(
    slot: str, pid: int | None, *, first_connection: bool, waited: float = 0.0
) -> Exception:
    """The slot is streaming to another process: on the feed's first connection someone
    else's (after ``waited`` seconds for it to be released); on a reconnect most likely our
    own previous walsender, still ending."""
    message = f"slot {slot} is in use by another process (pid {pid})"
    if first_connection:
        if waited > 0:
            message += f" (still after {waited:.1f} s)"
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


def server_message(message: str) -> str:
    """libpq's text of a server error as one line: its first, without the severity
    (``ERROR:  invalid publication_names syntax\nCONTEXT: ...`` -> ``invalid
    publication_names syntax``)."""
    lines = message.strip().splitlines()
    return re.sub(r"^(ERROR|FATAL|PANIC):\s+", "", lines[0].strip()) if lines else ""


def start_replication_error(slot: str, code: str, message: str) -> Exception:
    """The error for a refused START_REPLICATION, by its SQLSTATE ``code``."""
    message = server_message(message)
    if code == OBJECT_IN_USE:  # our previous walsender may still be ending
        return TransientBackendError(f"slot {slot}: {message}")
    if code == OBJECT_NOT_IN_PREREQUISITE_STATE:  # invalidated: the WAL it needs is gone
        return ResumeError(
            f"slot {slot} was invalidated ({message}); drop it"
            f" (changefeed slots --drop {slot}) and start again with --prefeed snapshot"
        )
    if code == UNDEFINED_OBJECT:  # the slot (or publication) is gone: the setup tells why
        return TransientBackendError(f"slot {slot}: {message}")
    return server_error(code, message or "START_REPLICATION failed")


def stream_ended(message: str, code: str | None = None) -> Exception:
    """The server ended the replication stream: with an error of SQLSTATE ``code`` (judged by
    `is_transient`: a terminated walsender or a shutdown is, a publication name pgoutput
    cannot parse is not), or without one (a lost connection: the feed reconnects)."""
    message = server_message(message)
    if code == UNDEFINED_OBJECT:  # the publication was dropped: the setup tells why
        return TransientBackendError(message)
    return server_error(code, message or "the server ended the replication stream")


def text(message: str | bytes | None) -> str:
    """libpq's messages come as bytes or str depending on the call: one stripped str."""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    return (message or "").strip()
