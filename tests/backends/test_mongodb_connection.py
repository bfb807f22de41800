"""Setting up a MongoDB change stream without a server: names, watch() options, the pre-image
fallback (against the fake collection of mongodb_fakes.py) and URL errors."""

from __future__ import annotations

import logging

import pymongo
import pytest
from mongodb_fakes import FakeCollection, failure

from changefeed import ALL, ConfigurationError, Operation
from changefeed.backends.mongodb.connection import (
    check_collection,
    make_client,
    open_stream,
    resolve_names,
    server_address,
    split_connection,
    watch_options,
)

ENDINGS = ["invalidate", "drop", "rename", "dropDatabase"]
TOO_OLD = "BSON field '$changeStream.fullDocumentBeforeChange' is an unknown field."


@pytest.fixture
def client():
    client = pymongo.MongoClient("mongodb://localhost:1/app", connect=False)
    yield client
    client.close()


def test_names_come_from_the_table_the_database_argument_or_the_url():
    assert resolve_names("app.tasks", "mongodb://h") == ("app", "tasks")
    assert resolve_names("tasks", "mongodb://h/app") == ("app", "tasks")
    assert resolve_names("app.tasks", "mongodb://h/other") == ("app", "tasks")
    assert resolve_names("events.2024", "mongodb://h", "app") == ("app", "events.2024")
    assert resolve_names("app.events.2024", "mongodb://h", "app") == ("app", "events.2024")
    with pytest.raises(ConfigurationError, match="no collection given"):
        resolve_names("", "mongodb://h/app")
    with pytest.raises(ConfigurationError, match=r"give it as <database>\.tasks"):
        resolve_names("tasks", "mongodb://h/")


def test_names_come_from_pymongo_objects(client):
    assert resolve_names("tasks", client) == ("app", "tasks")  # the URL's default database
    assert resolve_names("tasks", client["other"]) == ("other", "tasks")
    assert resolve_names("app.tasks", client["app"]["tasks"]) == ("app", "tasks")
    with pytest.raises(ConfigurationError, match="does not match the Collection given"):
        resolve_names("jobs", client["app"]["tasks"])


def test_a_connection_is_a_url_a_client_or_a_collection(client):
    assert split_connection("mongodb://h/app") == ("mongodb://h/app", None, None)
    assert split_connection(client) == (None, client, None)
    assert split_connection(client["app"]) == (None, client, None)
    collection = client["app"]["tasks"]
    assert split_connection(collection) == (None, client, collection)
    fake = FakeCollection()
    assert split_connection(fake) == (None, None, fake)
    with pytest.raises(ConfigurationError, match="no MongoDB connection given"):
        split_connection(None)
    with pytest.raises(ConfigurationError, match="cannot use a int as a MongoDB connection"):
        split_connection(42)


def test_a_bad_url_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="bad MongoDB URL"):
        make_client("mongodb://h:notaport/app", {})
    with pytest.raises(ConfigurationError, match="bad MongoDB URL"):
        make_client("http://h/app", {})


def test_a_client_made_for_a_url_is_timezone_aware_and_fails_fast(client):
    made = make_client("mongodb://localhost:1/app", {"connect": False})
    try:
        assert made.codec_options.tz_aware
        assert made.options.server_selection_timeout == 5
    finally:
        made.close()
    slow = make_client("mongodb://localhost:1/app?serverSelectionTimeoutMS=100",
                       {"connect": False})
    try:
        assert slow.options.server_selection_timeout == 0.1
    finally:
        slow.close()


def test_the_server_is_named_without_credentials(client):
    assert server_address("mongodb://user:p%40ss@db1:27018/app", None) == "db1:27018"
    assert server_address("mongodb:///app", None) == "localhost:27017"
    assert server_address(None, client) == "localhost:1"
    assert server_address(None, None) == "the server"


@pytest.mark.parametrize(
    ("pre_images", "asked"),
    [(None, "whenAvailable"), ("whenAvailable", "whenAvailable"), ("required", "required"),
     ("off", None)],
)
def test_watch_options_select_types_documents_and_pre_images(pre_images, asked):
    options = watch_options(
        Operation.INSERT | Operation.DELETE, {"resume_after": {"_data": "82"}},
        max_await_ms=500, full_document="updateLookup", pre_images=pre_images,
    )
    assert options["pipeline"] == [
        {"$match": {"operationType": {"$in": ["insert", "delete", *ENDINGS]}}}
    ]
    assert options["max_await_time_ms"] == 500
    assert options["resume_after"] == {"_data": "82"}
    assert options["full_document"] == "updateLookup"
    assert options.get("full_document_before_change") == asked


def test_watch_options_without_full_document_ask_for_none():
    options = watch_options(ALL, {}, max_await_ms=500, full_document=None, pre_images="off")
    assert "full_document" not in options and "full_document_before_change" not in options


def test_a_server_without_pre_images_is_watched_again_without_them(caplog):
    collection = FakeCollection(failure(40415, TOO_OLD), [])
    options = watch_options(ALL, {}, max_await_ms=500, full_document=None, pre_images=None)
    with caplog.at_level(logging.INFO, logger="changefeed.mongodb"):
        stream, refused = open_stream(collection, options, pre_images_optional=True,
                                      server="db:27017")
    assert refused and stream is collection.streams[0]
    assert "full_document_before_change" in collection.watches[0]
    assert "full_document_before_change" not in collection.watches[1]
    assert "MongoDB at db:27017 has no pre-images" in caplog.text
    assert "full_document_before_change" in options  # the caller's options are left alone


def test_required_pre_images_on_a_server_without_them_fail():
    collection = FakeCollection(failure(40415, TOO_OLD))
    options = watch_options(ALL, {}, max_await_ms=500, full_document=None, pre_images="required")
    with pytest.raises(pymongo.errors.OperationFailure):
        open_stream(collection, options, pre_images_optional=False, server="db:27017")
    assert len(collection.watches) == 1


def test_other_watch_failures_are_not_retried():
    collection = FakeCollection(failure(13, "not authorized"))
    options = watch_options(ALL, {}, max_await_ms=500, full_document=None, pre_images=None)
    with pytest.raises(pymongo.errors.OperationFailure, match="not authorized"):
        open_stream(collection, options, pre_images_optional=True, server="db:27017")
    assert len(collection.watches) == 1


def test_a_collection_that_cannot_be_listed_is_watched_without_a_warning(caplog):
    class Unlisted(FakeCollection):
        class database:  # noqa: N801 - stands for pymongo's attribute
            name = "app"

            @staticmethod
            def list_collection_names(filter=None):  # noqa: A002 - pymongo's name
                raise failure(13, "not authorized to list collections")

    with caplog.at_level(logging.WARNING, logger="changefeed.mongodb"):
        check_collection(Unlisted(), "app.tasks")
        check_collection(FakeCollection(exists=False), "app.tasks")
    assert caplog.text.count("does not exist (yet)") == 1
