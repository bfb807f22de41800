"""pymongo errors as changefeed errors, by server error code and label. Pure: no I/O.

`classify_error` is the one place that decides what a failure means, with one clear line for
humans; `is_transient_error` (the feed's `is_transient`) is whether it came out transient.
Like pymongo's own ``_resumable``, a change stream may resume after any error the server
labels ``ResumableChangeStreamError`` or whose code is in `RESUMABLE_CODES`.
"""

from __future__ import annotations

import pymongo.errors

from changefeed.errors import (
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    TransientBackendError,
    first_line,
)

# Server error codes (src/mongo/base/error_codes.yml).
RESUMABLE_CODES = frozenset({
    6,  # HostUnreachable
    7,  # HostNotFound
    43,  # CursorNotFound: the cursor was killed; resume with the token
    63,  # StaleShardVersion
    89,  # NetworkTimeout
    91,  # ShutdownInProgress
    133,  # FailedToSatisfyReadPreference
    150,  # StaleEpoch
    189,  # PrimarySteppedDown
    234,  # RetryChangeStream
    262,  # ExceededTimeLimit
    9001,  # SocketException
    10107,  # NotWritablePrimary
    11600,  # InterruptedAtShutdown
    11602,  # InterruptedDueToReplStateChange
    13388,  # StaleConfig
    13435,  # NotPrimaryNoSecondaryOk
    13436,  # NotPrimaryOrSecondary
    # Not in the server's resumable list, but safe to resume from the token: an operator (or
    # a test) killed the stream's getMore (killOp) or its cursor (killCursors while in use).
    237,  # CursorKilled
    11601,  # Interrupted
})
UNAUTHORIZED = 13
AUTHENTICATION_FAILED = 18
INVALID_RESUME_TOKEN = 260
CHANGE_STREAM_FATAL = 280
CHANGE_STREAM_HISTORY_LOST = 286
NOT_A_REPLICA_SET = 40573
UNKNOWN_FIELD = 40415  # e.g. fullDocumentBeforeChange on a server older than 6.0


def classify_error(exc: BaseException, *, table: str = "the collection",
                   server: str = "the server") -> ChangefeedError | None:
    """The changefeed error, with a clear one-line message, for a pymongo error (else None).

    Transient errors become `TransientBackendError`, the rest permanent ones; a changefeed
    error is returned as it is.
    """
    errors = pymongo.errors
    if isinstance(exc, ChangefeedError):
        return exc
    if not isinstance(exc, errors.PyMongoError):
        return None
    if isinstance(exc, errors.ConfigurationError):
        return ConfigurationError(f"bad MongoDB URL or option: {first_line(exc)}")
    if isinstance(exc, errors.ServerSelectionTimeoutError):
        reason = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
        return TransientBackendError(f"cannot reach MongoDB at {server}: {_one_line(reason)}")
    if isinstance(exc, errors.ConnectionFailure):  # AutoReconnect, NetworkTimeout, NotPrimary
        return TransientBackendError(f"connection to MongoDB lost: {first_line(exc)}")
    if not isinstance(exc, errors.OperationFailure):
        if exc.has_error_label("ResumableChangeStreamError"):
            return TransientBackendError(f"MongoDB: {first_line(exc)}")
        return None
    code = exc.code
    text = _server_message(exc)
    if code == CHANGE_STREAM_HISTORY_LOST:
        return ResumeError(
            f"the saved resume token of {table} is older than the oldest change in the oplog"
            " (ChangeStreamHistoryLost): changes were lost; delete the checkpoint and restart"
            " with --prefeed snapshot, or pass resync=True to re-read the collection"
        )
    if code == INVALID_RESUME_TOKEN:
        return ResumeError(
            f"the saved resume token of {table} is not valid on {server} ({text}): was the"
            " checkpoint made for another cluster? delete it and restart with --prefeed snapshot"
        )
    if code == NOT_A_REPLICA_SET or "only supported on replica sets" in text:
        return PermanentBackendError(
            f"change streams need a replica set, but MongoDB at {server} is a standalone server:"
            " start it as a single-node replica set (docker compose up -d mongodb, or run mongod"
            " --replSet rs0 and then rs.initiate() in mongosh)"
        )
    if code == UNAUTHORIZED:
        return PermanentBackendError(
            f"not authorized to watch {table} ({text}): the user needs the find and changeStream"
            " actions on it (e.g. the read role on its database)"
        )
    if code == AUTHENTICATION_FAILED:
        return PermanentBackendError(
            f"authentication to MongoDB at {server} failed: check the user, password and"
            " authSource in the URL"
        )
    if code == CHANGE_STREAM_FATAL or exc.has_error_label("NonResumableChangeStreamError"):
        return PermanentBackendError(f"the change stream of {table} failed for good: {text}")
    if code in RESUMABLE_CODES or exc.has_error_label("ResumableChangeStreamError"):
        return TransientBackendError(f"MongoDB {_code_name(exc)}: {text}")
    return PermanentBackendError(f"MongoDB error {_code_name(exc)}: {text}")


def is_transient_error(exc: BaseException) -> bool:
    """Whether reconnecting may cure ``exc`` (a pymongo or changefeed error)."""
    return isinstance(classify_error(exc), TransientBackendError)


def is_history_lost(exc: BaseException) -> bool:
    """Whether the stream's resume token is older than the oplog (ChangeStreamHistoryLost)."""
    return isinstance(exc, pymongo.errors.OperationFailure) and \
        exc.code == CHANGE_STREAM_HISTORY_LOST


def lacks_pre_images(exc: BaseException) -> bool:
    """Whether ``exc`` is a server older than 6.0 refusing ``fullDocumentBeforeChange``."""
    return isinstance(exc, pymongo.errors.OperationFailure) and (
        exc.code == UNKNOWN_FIELD or "fullDocumentBeforeChange" in str(exc)
    )


def _server_message(exc: pymongo.errors.OperationFailure) -> str:
    details = exc.details or {}
    message = details.get("errmsg") or str(exc).split(", full error:")[0]
    return _one_line(str(message))


def _code_name(exc: pymongo.errors.OperationFailure) -> str:
    name = (exc.details or {}).get("codeName")
    return f"{exc.code} {name}" if name else str(exc.code)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


__all__ = [
    "RESUMABLE_CODES",
    "classify_error",
    "is_history_lost",
    "is_transient_error",
    "lacks_pre_images",
]
