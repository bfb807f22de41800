"""Classifying pymongo errors by server code and label, on real pymongo exception objects."""

from __future__ import annotations

import pytest
from mongodb_fakes import failure
from pymongo.errors import (
    AutoReconnect,
    ConfigurationError,
    CursorNotFound,
    NetworkTimeout,
    PyMongoError,
    ServerSelectionTimeoutError,
)

import changefeed
from changefeed import PermanentBackendError, ResumeError, TransientBackendError
from changefeed.backends.mongodb import MongoChangeFeed
from changefeed.backends.mongodb.errors import (
    classify_error,
    is_history_lost,
    is_transient_error,
    lacks_pre_images,
)


@pytest.mark.parametrize(
    "exc",
    [
        AutoReconnect("connection closed"),
        NetworkTimeout("timed out"),
        ServerSelectionTimeoutError("localhost:27017: [Errno 111] Connection refused"),
        CursorNotFound("cursor id 123 not found", code=43),
        failure(43, "cursor id 123 not found"),
        failure(189, "primary stepped down", name="PrimarySteppedDown"),
        failure(10107, "not primary"),
        failure(11602, "interrupted due to repl state change"),
        failure(234, "retry change stream"),
        failure(11601, "operation was interrupted", name="Interrupted"),  # killOp of getMore
        failure(237, "cursor killed", name="CursorKilled"),
        failure(9999, "some new resumable error", labels=["ResumableChangeStreamError"]),
        TransientBackendError("already classified"),
    ],
)
def test_connection_losses_and_resumable_errors_are_transient(exc):
    assert is_transient_error(exc)
    feed = MongoChangeFeed("app.tasks", connection="mongodb://localhost")
    assert feed.is_transient(exc)


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (failure(286, "Resume of change stream was not possible, as the resume point may no"
                      " longer be in the oplog.", name="ChangeStreamHistoryLost"),
         ResumeError, ["older than the oldest change", "--prefeed snapshot", "resync=True"]),
        (failure(260, "Invalid resume token"), ResumeError, ["not valid", "delete it"]),
        (failure(40573, "The $changeStream stage is only supported on replica sets"),
         PermanentBackendError, ["need a replica set", "docker compose", "rs.initiate()"]),
        (failure(13, "not authorized on app to execute command"), PermanentBackendError,
         ["not authorized to watch app.tasks", "changeStream"]),
        (failure(18, "Authentication failed."), PermanentBackendError,
         ["authentication to MongoDB at db:27017 failed"]),
        (failure(280, "the pipeline modified _id"), PermanentBackendError,
         ["failed for good", "modified _id"]),
        (failure(2, "bad $match", name="BadValue"), PermanentBackendError,
         ["MongoDB error 2 BadValue: bad $match"]),
        (failure(286, labels=["ResumableChangeStreamError"]), ResumeError, []),
    ],
)
def test_permanent_errors_get_one_clear_line(exc, kind, words):
    error = classify_error(exc, table="app.tasks", server="db:27017")
    assert type(error) is kind
    assert not is_transient_error(exc)
    message = str(error)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_an_unreachable_server_is_named_in_one_line():
    exc = ServerSelectionTimeoutError(
        "localhost:1: [Errno 111] Connection refused (configured timeouts: socketTimeoutMS:"
        " 20000.0ms, connectTimeoutMS: 20000.0ms), Timeout: 5.0s, Topology Description: <...>"
    )
    error = classify_error(exc, server="localhost:1")
    assert isinstance(error, TransientBackendError)
    assert str(error) == "cannot reach MongoDB at localhost:1: localhost:1: [Errno 111]" \
        " Connection refused"


def test_other_exceptions_are_not_pymongo_s_to_classify():
    assert classify_error(ValueError("x")) is None
    assert not is_transient_error(ValueError("x"))



def test_a_driver_configuration_error_is_a_configuration_error():
    error = classify_error(ConfigurationError("Unknown option foo"))
    assert type(error) is changefeed.ConfigurationError
    assert str(error) == "bad MongoDB URL or option: Unknown option foo"


def test_client_side_errors_are_transient_only_when_labelled_resumable():
    labelled = PyMongoError("cursor lost", error_labels=["ResumableChangeStreamError"])
    assert str(classify_error(labelled)) == "MongoDB: cursor lost"
    assert is_transient_error(labelled)
    assert classify_error(PyMongoError("something else")) is None


def test_changefeed_errors_are_kept_as_they_are():
    error = ResumeError("lost")
    assert classify_error(error) is error and not is_transient_error(error)


def test_history_lost_and_missing_pre_images_are_told_by_code():
    assert is_history_lost(failure(286, "resume point may no longer be in the oplog"))
    assert not is_history_lost(failure(260, "Invalid resume token"))
    assert not is_history_lost(AutoReconnect("closed"))
    assert lacks_pre_images(failure(40415, "BSON field 'x' is an unknown field."))
    assert lacks_pre_images(failure(9, "unknown option fullDocumentBeforeChange"))
    assert not lacks_pre_images(failure(2, "bad $match"))
    assert not lacks_pre_images(AutoReconnect("fullDocumentBeforeChange"))
