"""The RethinkDB backend's error classification, pure: which driver errors a reconnect may
cure, and the one-line errors that connecting and looking up the table turn into."""

from __future__ import annotations

import pytest
from rethinkdb.errors import (
    ReqlAuthError,
    ReqlAvailabilityError,
    ReqlDriverError,
    ReqlInternalError,
    ReqlNonExistenceError,
    ReqlOpFailedError,
    ReqlOpIndeterminateError,
    ReqlPermissionError,
    ReqlQueryLogicError,
    ReqlResourceLimitError,
    ReqlRuntimeError,
    ReqlServerCompileError,
    ReqlTimeoutError,
    ReqlUserError,
)

from changefeed.backends.rethinkdb import RethinkChangeFeed, is_transient_error
from changefeed.backends.rethinkdb.errors import connect_error, reason, table_error
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    TransientBackendError,
)


@pytest.mark.parametrize(
    "exc",
    [
        ReqlDriverError("Connection is closed."),
        ReqlDriverError("Could not connect to localhost:28015. Error: [Errno 111] refused"),
        ReqlTimeoutError("localhost", 28015),
        ReqlRuntimeError("Connection is closed."),  # the cursor of a closed connection
        ReqlOpFailedError("Cannot perform read: primary replica for shard [\"\", +inf) not"
                          " available"),
        ReqlOpFailedError("Changefeed aborted (table unavailable)."),
        ReqlOpIndeterminateError("Cannot perform write: the primary replica changed."),
        ReqlAvailabilityError("Changefeed aborted (unavailable)."),
        ReqlResourceLimitError("Changefeed queue overflowed."),
        TransientBackendError("the RethinkDB changefeed of app.tasks ended"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError("network unreachable"),
    ],
    ids=repr,
)
def test_transient_errors(exc):
    assert is_transient_error(exc)
    assert RethinkChangeFeed("app.tasks").is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ReqlAuthError("Wrong password", "localhost", 28015),
        ReqlOpFailedError("Table `app.nope` does not exist."),
        ReqlOpFailedError("Database `nope` does not exist."),
        ReqlPermissionError("User `bob` does not have the required `read` permissions."),
        ReqlQueryLogicError("Cannot call `changes` on an eager stream."),
        ReqlNonExistenceError("No attribute `x` in object."),
        ReqlServerCompileError("Unrecognized optional argument `foo`."),
        ReqlResourceLimitError("Array over size limit `100000`."),
        ReqlUserError("custom"),
        ReqlInternalError("internal"),
        ReqlRuntimeError("something else"),
        ConfigurationError("table 'nope' does not exist"),
        PermanentBackendError("cannot log in"),
        ValueError("bug"),
    ],
    ids=repr,
)
def test_permanent_errors(exc):
    assert not is_transient_error(exc)


# -- what failures mean -----------------------------------------------------------------------


def test_the_reason_drops_the_drivers_prefix_and_keeps_one_line():
    refused = ReqlDriverError("Could not connect to h:28015. Error: [Errno 111] refused\nmore")
    assert reason(refused) == "[Errno 111] refused"
    assert reason(ReqlDriverError("Connection is closed.")) == "Connection is closed."
    assert reason(ReqlDriverError("")) == "ReqlDriverError"


def test_a_refused_connection_is_transient_and_names_the_server():
    error = connect_error(
        ReqlDriverError("Could not connect to h:28015. Error: [Errno 111] Connection refused"),
        "h:28015", "admin",
    )
    assert isinstance(error, TransientBackendError)
    assert str(error) == "cannot connect to RethinkDB at h:28015: [Errno 111] Connection refused"
    assert isinstance(connect_error(ReqlTimeoutError("h", 28015), "h:28015", "admin"),
                      TransientBackendError)


def test_a_login_failure_is_permanent_and_names_the_user():
    error = connect_error(ReqlAuthError("Wrong password", "h", 28015), "h:28015", "bob")
    assert isinstance(error, PermanentBackendError)
    assert str(error).startswith("cannot log in to RethinkDB at h:28015 as 'bob': ")
    assert connect_error(ValueError("bug"), "h:28015", "bob") is None


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (ReqlOpFailedError("Table `app.nope` does not exist."), ConfigurationError,
         "table 'nope' does not exist in RethinkDB database 'app'"),
        (ReqlOpFailedError("Database `app` does not exist."), ConfigurationError,
         "database 'app' does not exist on RethinkDB at h:28015"),
        (ReqlPermissionError("User `bob` does not have the required `read` permissions."),
         PermanentBackendError, "no permission to read app.nope on RethinkDB at h:28015: User"
         " `bob` does not have the required `read` permissions."),
    ],
    ids=["table", "database", "permission"],
)
def test_table_lookup_failures(exc, kind, message):
    error = table_error(exc, "app", "nope", "h:28015")
    assert type(error) is kind and str(error) == message


@pytest.mark.parametrize(
    "exc",
    [ReqlOpFailedError("Cannot perform read: primary replica not available"),
     ReqlDriverError("Connection is closed."), ValueError("bug")],
    ids=repr,
)
def test_other_table_lookup_failures_are_left_to_the_retry_predicate(exc):
    assert table_error(exc, "app", "tasks", "h:28015") is None
