"""The MongoDB feed without a server: these are NOT live tests.

The feed's resume logic runs through the real `ChangeFeed.changes()` / `ack()` against a fake
at the driver-cursor boundary only (mongodb_fakes.py): a collection whose ``watch(**kwargs)``
records its arguments and returns a scripted stream with ``try_next()``, ``resume_token`` and
``close()``. The decoder, positions and errors have their own tests (test_mongodb_events.py,
test_mongodb_positions.py, test_mongodb_errors.py); the live tests (test_mongodb_live.py)
cover a real replica set.
"""

from __future__ import annotations

import pymongo
import pytest
from mongodb_fakes import FakeCollection, PostBatch, event, failure, token
from pymongo.errors import AutoReconnect, CursorNotFound

from changefeed import (
    ALL,
    ConfigurationError,
    FileCheckpoint,
    MemoryCheckpoint,
    Operation,
    PermanentBackendError,
    ResumeError,
    Retry,
    get_changefeed,
)
from changefeed.backends.mongodb import MongoChangeFeed

FAST = Retry(initial=0.01, maximum=0.02)
ENDINGS = ["invalidate", "drop", "rename", "dropDatabase"]


# -- the feed, through a fake at the driver-cursor boundary --------------------------------------


def make_feed(collection, operation=ALL, **options) -> MongoChangeFeed:
    options.setdefault("retry", FAST)
    return MongoChangeFeed("app.tasks", operation, connection=collection, **options)


def resume_options(watch: dict) -> dict:
    names = ("resume_after", "start_after", "start_at_operation_time")
    return {name: watch[name] for name in names if name in watch}


def test_the_stream_is_watched_with_the_selected_types_lookup_and_pre_images():
    collection = FakeCollection([event(1)])
    feed = make_feed(collection, Operation.INSERT | Operation.DELETE)
    [change] = list(feed.changes(limit=1, timeout=5))
    assert change.operation is Operation.INSERT and change.position == token(1)
    [watch] = collection.watches
    assert watch["pipeline"] == [
        {"$match": {"operationType": {"$in": ["insert", "delete", *ENDINGS]}}}
    ]
    assert watch["full_document"] == "updateLookup"
    assert watch["full_document_before_change"] == "whenAvailable"
    assert 0 < watch["max_await_time_ms"] < 1000
    assert resume_options(watch) == {}
    assert collection.streams[0].closed


def test_snapshot_batch_is_the_old_name_of_chunk_size():
    assert make_feed(FakeCollection([])).chunk_size == 1000
    with pytest.deprecated_call(match="chunk_size"):
        assert make_feed(FakeCollection([]), snapshot_batch=5).chunk_size == 5


def test_pre_images_can_be_required_or_turned_off():
    collection = FakeCollection([event(1)], [event(1)])
    list(make_feed(collection, pre_images="required").changes(limit=1, timeout=5))
    list(make_feed(collection, pre_images=False, full_document=None).changes(limit=1,
                                                                             timeout=5))
    assert collection.watches[0]["full_document_before_change"] == "required"
    assert "full_document_before_change" not in collection.watches[1]
    assert "full_document" not in collection.watches[1]


def test_servers_without_pre_images_are_watched_without_them():
    too_old = failure(40415, "BSON field '$changeStream.fullDocumentBeforeChange' is an unknown"
                             " field.")
    collection = FakeCollection(too_old, [event(1)])
    [change] = list(make_feed(collection).changes(limit=1, timeout=5))
    assert change.position == token(1)
    assert "full_document_before_change" in collection.watches[0]
    assert "full_document_before_change" not in collection.watches[1]


def test_operations_outside_the_mask_are_skipped_and_idle_ticks_are_yielded():
    collection = FakeCollection([event(1, "insert"), None, event(2, "update"), None,
                                 event(3, "delete"), event(4, "createIndexes")])
    feed = make_feed(collection, Operation.DELETE)
    seen = list(feed.changes(ticks=True, timeout=5, limit=1))
    assert seen[:2] == [None, None]
    assert [c.operation for c in seen if c is not None] == [Operation.DELETE]
    assert seen[-1].position == token(3)


def test_a_missing_collection_is_watched_with_a_warning(caplog):
    collection = FakeCollection([event(1)], exists=False)
    with caplog.at_level("WARNING", logger="changefeed.mongodb"):
        assert len(list(make_feed(collection).changes(limit=1, timeout=5))) == 1
    assert "collection app.tasks does not exist (yet); watching it anyway" in caplog.text


def test_after_a_transient_error_it_resumes_after_the_last_acknowledged_token():
    collection = FakeCollection(
        [event(1), event(2, "update"), AutoReconnect("connection reset by peer")],
        [event(2, "update"), event(3, "delete")],
    )
    feed = make_feed(collection)
    changes = feed.changes(timeout=5)
    first = next(changes)
    feed.ack(first.position)
    second = next(changes)  # delivered but never acknowledged
    again = next(changes)
    third = next(changes)
    changes.close()
    assert resume_options(collection.watches[1]) == {"resume_after": token(1)}
    assert again.position == second.position == token(2)
    assert third.operation is Operation.DELETE
    assert feed.stats.reconnects == 1


def test_when_everything_was_acknowledged_it_resumes_from_the_streams_latest_token():
    collection = FakeCollection(
        [event(1), PostBatch(7), CursorNotFound("cursor id 42 not found", code=43)],
        [event(8)],
    )
    feed = make_feed(collection)
    changes = feed.changes(timeout=5)
    feed.ack(next(changes).position)
    assert next(changes).position == token(8)
    changes.close()
    assert resume_options(collection.watches[1]) == {"resume_after": token(7)}


def test_a_new_feed_resumes_after_the_checkpoint(tmp_path):
    checkpoint = FileCheckpoint(tmp_path / "checkpoint.json")
    collection = FakeCollection([event(1), event(2)])
    feed = make_feed(collection, checkpoint=checkpoint)
    for change in feed.changes(limit=2, timeout=5):
        feed.ack(change.position)
    restarted = make_feed(FakeCollection([event(3)]), checkpoint=FileCheckpoint(checkpoint.path))
    assert restarted.acknowledged == token(2)
    list(restarted.changes(limit=1, timeout=5))
    assert resume_options(restarted.connection.watches[0]) == {"resume_after": token(2)}


def test_a_checkpoint_that_is_no_resume_token_is_refused():
    checkpoint = MemoryCheckpoint()
    checkpoint.save("app.tasks", "0/16B3748")
    feed = make_feed(FakeCollection([]), checkpoint=checkpoint)
    with pytest.raises(ConfigurationError, match="not a MongoDB resume token"):
        list(feed.changes(timeout=5))


def test_an_invalidate_ends_the_feed_with_the_reason_and_it_can_start_after_it(caplog):
    invalidate = {"_id": token(4), "operationType": "invalidate"}
    drop = {"_id": token(3), "operationType": "drop", "ns": {"db": "app", "coll": "tasks"}}
    collection = FakeCollection([event(1), drop, None, invalidate, event(99)],
                                [AutoReconnect("connection reset")], [event(5)])
    feed = make_feed(collection)
    with caplog.at_level("WARNING", logger="changefeed.mongodb"):
        changes = list(feed.changes(timeout=5))
    assert [c.position for c in changes] == [token(1)]
    assert feed.ended is not None and feed.ended.reason == "drop"
    assert feed.ended.message == "collection app.tasks was dropped; the change stream ended"
    assert feed.ended.message in caplog.text
    feed.ack(changes[0].position)
    # The same feed iterated again (e.g. once the collection exists again) starts after it.
    assert [c.position for c in feed.changes(limit=1, timeout=5)] == [token(5)]
    assert resume_options(collection.watches[1]) == {"start_after": token(4)}
    assert resume_options(collection.watches[2]) == {"start_after": token(4)}  # no progress


def test_history_lost_is_a_resume_error():
    checkpoint = MemoryCheckpoint()
    checkpoint.save("app.tasks", token(1))
    lost = failure(286, "resume point may no longer be in the oplog",
                   name="ChangeStreamHistoryLost")
    feed = make_feed(FakeCollection(lost), checkpoint=checkpoint)
    with pytest.raises(ResumeError, match="ChangeStreamHistoryLost"):
        list(feed.changes(timeout=5))


def test_history_lost_with_resync_reads_the_collection_again():
    checkpoint = MemoryCheckpoint()
    checkpoint.save("app.tasks", token(1))
    lost = failure(286, "resume point may no longer be in the oplog")
    collection = FakeCollection(
        [lost], [event(9)], documents=[{"_id": 1, "n": 5}, {"_id": 2, "n": 6}],
        opened_at=token(8),
    )
    feed = make_feed(collection, checkpoint=checkpoint, resync=True)
    changes = list(feed.changes(limit=3, timeout=5))
    assert resume_options(collection.watches[0]) == {"resume_after": token(1)}
    assert resume_options(collection.watches[1]) == {}
    assert len(collection.finds) == 1
    assert [(c.snapshot, c.key) for c in changes] == [(True, {"_id": 1}), (True, {"_id": 2}),
                                                       (False, {"_id": 1})]


def test_snapshot_prefeed_reads_the_collection_then_streams_from_where_it_opened():
    documents = [{"_id": 1, "n": 1}, {"_id": 2, "n": 2}, {"_id": 3, "n": 3}]
    collection = FakeCollection([event(11, "update", key=2)], documents=documents,
                                opened_at=token(10))
    feed = make_feed(collection, prefeed="snapshot")
    changes = list(feed.changes(limit=4, timeout=5))
    snapshot, streamed = changes[:3], changes[3]
    assert all(c.snapshot and c.operation is Operation.INSERT for c in snapshot)
    assert [c.new for c in snapshot] == documents
    assert [c.position for c in snapshot] == [
        {"_data": token(10)["_data"], "snapshot": 1},
        {"_data": token(10)["_data"], "snapshot": 2},
        {"_data": token(10)["_data"], "snapshot": 3, "done": True},
    ]
    assert not streamed.snapshot and streamed.operation is Operation.UPDATE
    # One stream, opened before the read: what changes during the read is streamed after it.
    assert len(collection.watches) == 1 and resume_options(collection.watches[0]) == {}
    assert collection.finds == [{"batch_size": 1000}]


def test_a_finished_snapshot_is_not_taken_again_after_a_restart():
    checkpoint = MemoryCheckpoint()
    checkpoint.save("app.tasks", {"_data": token(10)["_data"], "snapshot": 3, "done": True})
    collection = FakeCollection([event(11)], documents=[{"_id": 1}])
    feed = make_feed(collection, prefeed="snapshot", checkpoint=checkpoint)
    [change] = list(feed.changes(limit=1, timeout=5))
    assert not change.snapshot and collection.finds == []
    assert resume_options(collection.watches[0]) == {"resume_after": token(10)}


def test_an_unfinished_snapshot_is_taken_again_after_a_restart():
    checkpoint = MemoryCheckpoint()
    checkpoint.save("app.tasks", {"_data": token(10)["_data"], "snapshot": 1})
    collection = FakeCollection([], documents=[{"_id": 1}, {"_id": 2}], opened_at=token(20))
    feed = make_feed(collection, prefeed="snapshot", checkpoint=checkpoint)
    changes = list(feed.changes(limit=2, timeout=5))
    assert [c.snapshot for c in changes] == [True, True] and len(collection.finds) == 1
    assert resume_options(collection.watches[0]) == {}


def test_a_transient_error_after_the_snapshot_does_not_read_it_again():
    collection = FakeCollection(
        [AutoReconnect("primary stepped down")], [event(12)],
        documents=[{"_id": 1}], opened_at=token(10),
    )
    feed = make_feed(collection, prefeed="snapshot")
    changes = feed.changes(timeout=5)
    feed.ack(next(changes).position)
    assert next(changes).position == token(12)
    changes.close()
    assert len(collection.finds) == 1
    assert resume_options(collection.watches[1]) == {"resume_after": token(10)}


# -- connections and names -----------------------------------------------------------------------


def test_collection_names_come_from_the_table_the_url_or_the_database_argument():
    assert get_changefeed("mongodb://localhost/app", "tasks").table == "app.tasks"
    assert get_changefeed("mongodb://localhost/", "app.tasks").table == "app.tasks"
    assert get_changefeed("mongodb://h1,h2/app?replicaSet=rs0", "app.tasks").table == "app.tasks"
    feed = get_changefeed("mongodb://localhost", "events.2024", database="app")
    assert (feed.database_name, feed.collection_name) == ("app", "events.2024")
    with pytest.raises(ConfigurationError, match="no database for collection 'tasks'"):
        get_changefeed("mongodb://localhost", "tasks")


def test_get_changefeed_dispatches_on_urls_and_pymongo_objects():
    client = pymongo.MongoClient("mongodb://localhost:1/app", connect=False)
    try:
        by_url = get_changefeed("mongodb://localhost/app", "tasks", Operation.INSERT)
        by_client = get_changefeed(client, "tasks")
        by_database = get_changefeed(client["other"], "tasks")
        by_collection = get_changefeed(client["app"]["tasks"], "tasks")
        assert isinstance(by_url, MongoChangeFeed) and by_url.operation is Operation.INSERT
        assert by_client.table == "app.tasks"
        assert by_database.table == "other.tasks"
        assert by_collection.table == "app.tasks"
        with pytest.raises(ConfigurationError, match="does not match"):
            get_changefeed(client["app"]["tasks"], "jobs")
        by_client.close()  # a client passed in stays open and in use
        assert by_client._get_collection().database.client is client  # private: no server
    finally:
        client.close()


def test_bad_options_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="pre_images"):
        MongoChangeFeed("app.tasks", connection="mongodb://localhost", pre_images="always")
    with pytest.raises(ConfigurationError, match="full_document"):
        MongoChangeFeed("app.tasks", connection="mongodb://localhost", full_document="yes")
    with pytest.raises(ConfigurationError, match="no MongoDB connection"):
        MongoChangeFeed("app.tasks")
    with pytest.raises(ConfigurationError, match="cannot use a dict as a MongoDB connection"):
        MongoChangeFeed("app.tasks", connection={})


def test_a_server_unreachable_at_start_is_a_permanent_error_naming_it():
    # Retrying forever would hide a wrong URL; once connected, losing it is transient.
    feed = get_changefeed(
        "mongodb://127.0.0.1:1/app", "tasks", client_options={"serverSelectionTimeoutMS": 100},
    )
    with pytest.raises(PermanentBackendError, match="cannot reach MongoDB at 127.0.0.1:1"):
        list(feed.changes(timeout=10))
    assert feed._client is None  # the client the feed made was closed (private: no server)
