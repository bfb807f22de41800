"""Which RethinkDB driver errors a reconnect may cure, and what each one means to a user.

Pure functions of the driver's exceptions (no I/O): `is_transient_error` is the feed's retry
predicate, `connect_error` and `table_error` turn the failures of connecting and of looking up
the table into changefeed's errors with one clear line each. The driver's exception is kept as
``__cause__`` by the callers (``raise ... from exc``).

The driver's own tree, for reference: `ReqlDriverError` (the connection: lost, refused,
timed out; `ReqlAuthError` below it), and `ReqlRuntimeError` with `ReqlAvailabilityError`
(unavailable replicas; `ReqlOpFailedError` also says "does not exist"), `ReqlPermissionError`,
`ReqlQueryLogicError`, `ReqlResourceLimitError` below it.
"""

from __future__ import annotations

import re

from rethinkdb.errors import (
    ReqlAuthError,
    ReqlAvailabilityError,
    ReqlCompileError,
    ReqlDriverError,
    ReqlError,
    ReqlOpFailedError,
    ReqlPermissionError,
    ReqlQueryLogicError,
    ReqlResourceLimitError,
    ReqlRuntimeError,
)

from changefeed.errors import (
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    TransientBackendError,
    first_line,
)


def is_transient_error(exc: BaseException) -> bool:
    """Whether reconnecting may cure ``exc`` (a pure predicate on the exception).

    Transient: a lost or refused connection (`ReqlDriverError`, timeouts, ``OSError``), an
    unavailable table or replica (`ReqlAvailabilityError`, except "does not exist"), a
    changefeed the server aborted or whose queue overflowed. Permanent: login failures,
    missing databases or tables, missing permissions, bad queries.
    """
    if isinstance(exc, ChangefeedError):
        return isinstance(exc, TransientBackendError)
    if isinstance(exc, ReqlAuthError):
        return False
    if isinstance(exc, ReqlDriverError):  # connection lost or refused, ReqlTimeoutError
        return True
    if isinstance(exc, ReqlAvailabilityError):  # ReqlOpFailedError, ReqlOpIndeterminateError
        return "does not exist" not in str(exc)
    if isinstance(exc, ReqlResourceLimitError):
        return "changefeed" in str(exc).lower()
    if isinstance(exc, (ReqlPermissionError, ReqlQueryLogicError, ReqlCompileError)):
        return False
    if type(exc) is ReqlRuntimeError:  # what the driver gives cursors of a closed connection
        return "connection is closed" in str(exc).lower()
    if isinstance(exc, ReqlError):
        return False
    return isinstance(exc, OSError)


def reason(exc: BaseException) -> str:
    """The first line of the driver's message, without its "Could not connect to h:p" prefix
    (the messages built here name the server themselves)."""
    text = re.sub(r"^Could not connect to \S+?[.,] (Error: )?", "", first_line(exc))
    return text or type(exc).__name__


def connect_error(exc: BaseException, where: str, user: str) -> ChangefeedError | None:
    """What failing to connect to ``where`` (``host:port``) as ``user`` means, or None when
    ``exc`` is no connection failure.

    A login failure is permanent. A refused or timed-out connection is transient: the server
    may come back. Before the feed ever reached its server, the base `ChangeFeed` ends the feed
    on it anyway, keeping this message.
    """
    if isinstance(exc, ReqlAuthError):
        return PermanentBackendError(
            f"cannot log in to RethinkDB at {where} as {user!r}: {reason(exc)}"
        )
    if isinstance(exc, (ReqlDriverError, OSError)):
        return TransientBackendError(f"cannot connect to RethinkDB at {where}: {reason(exc)}")
    return None


def table_error(exc: BaseException, db: str, table: str, where: str) -> ChangefeedError | None:
    """What failing to look up ``db.table`` on ``where`` means, or None when ``exc`` says
    nothing about the table (it is then classified by `is_transient_error` as it is)."""
    if isinstance(exc, ReqlOpFailedError):
        text = str(exc)
        if "does not exist" not in text:
            return None
        if text.startswith("Database"):
            return ConfigurationError(f"database {db!r} does not exist on RethinkDB at {where}")
        return ConfigurationError(f"table {table!r} does not exist in RethinkDB database {db!r}")
    if isinstance(exc, ReqlPermissionError):
        return PermanentBackendError(
            f"no permission to read {db}.{table} on RethinkDB at {where}: {reason(exc)}"
        )
    return None
