"""The MongoDB backend without a server: these are NOT live tests.

The decoder runs on change event documents in the shapes of MongoDB's change events reference
(recorded/mongodb_events.json, loaded with bson.json_util so Timestamps, ObjectIds, dates and
Decimal128 are real bson values). The feed's resume logic runs through the real
`ChangeFeed.changes()` / `ack()` against a fake at the driver-cursor boundary only: a collection
whose ``watch(**kwargs)`` records its arguments and returns a scripted stream with
``try_next()``, ``resume_token`` and ``close()``. Error classification uses real pymongo
exception objects. The live tests (test_mongodb_live.py) cover a real replica set.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import bson
import pymongo
import pytest
from bson import Binary, Decimal128, Int64, ObjectId, json_util
from pymongo.errors import (
    AutoReconnect,
    CursorNotFound,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
)

from changefeed import (
    ALL,
    Change,
    ConfigurationError,
    FileCheckpoint,
    MemoryCheckpoint,
    Operation,
    PermanentBackendError,
    ResumeError,
    Retry,
    TransientBackendError,
    get_changefeed,
)
from changefeed.backends.mongodb import (
    MongoChangeFeed,
    StreamEnded,
    apply_update,
    classify_error,
    decode_event,
    is_transient_error,
    operation_types,
    position_token,
    token_position,
)

RECORDED = json_util.loads(
    (Path(__file__).parent / "recorded" / "mongodb_events.json").read_text()
)
EVENTS = RECORDED["events"]
A = ObjectId("6553f0ff1a2b3c4d5e6f7081")
B = ObjectId("6553f0ff1a2b3c4d5e6f7082")
FAST = Retry(initial=0.01, maximum=0.02)


def decode(name: str, **options):
    return decode_event(EVENTS[name], "app.tasks", **options)


# -- the decoder ---------------------------------------------------------------------------------


def test_insert_becomes_an_insert_with_bson_values_kept():
    change = decode("insert")
    assert isinstance(change, Change)
    assert change.operation is Operation.INSERT and change.table == "app.tasks"
    assert change.key == {"_id": A} and change.old is None and not change.snapshot
    new = change.new
    assert new["_id"] == A and new["title"] == "write docs" and new["done"] is False
    assert new["tags"] == ["docs", "urgent", "q4"] and new["owner"]["team"] == "core"
    assert isinstance(new["estimate"], Decimal128)
    assert new["estimate"].to_decimal() == Decimal("2.50")
    assert new["points"] == 9007199254740993 and isinstance(new["points"], Int64)
    assert change.position == {"_data": EVENTS["insert"]["_id"]["_data"]}
    assert change.transaction is None and change.meta is None


def test_committed_at_is_the_wall_time_in_utc():
    change = decode("insert")
    assert change.committed_at == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=timezone.utc)


def test_committed_at_falls_back_to_the_cluster_time_without_wall_time():
    change = decode("insert_without_wall_time")
    assert change.committed_at == datetime.fromtimestamp(1700000011, timezone.utc)
    assert change.committed_at.tzinfo is not None


def test_update_has_the_looked_up_document_and_its_update_description():
    change = decode("update")
    assert change.operation is Operation.UPDATE
    assert change.new["done"] is True and change.new["owner"] == {"name": "Ada", "team": "docs"}
    assert change.old == {"_id": A}  # no pre-image: the key only
    assert change.key == {"_id": A}
    assert change.meta == {
        "update_description": {
            "updated_fields": {"done": True, "owner.team": "docs"},
            "removed_fields": ["estimate"],
            "truncated_arrays": [],
        },
        "new_source": "lookup",
    }


def test_update_with_post_images_says_so():
    change = decode("update", full_document="whenAvailable")
    assert change.meta["new_source"] == "post-image"


def test_update_of_a_document_deleted_since_has_no_new_but_says_what_changed():
    change = decode("update_document_gone")
    assert change.operation is Operation.UPDATE
    assert change.new is None and change.old == {"_id": A} and change.key == {"_id": A}
    assert change.meta["new_source"] == "missing"
    assert change.meta["update_description"]["updated_fields"] == {"title": "write better docs"}


def test_update_with_a_pre_image_rebuilds_new_from_it():
    event = EVENTS["update_with_pre_image"]
    change = decode("update_with_pre_image")
    assert change.old == event["fullDocumentBeforeChange"]
    assert change.meta["new_source"] == "pre-image+update"
    assert change.new == {
        "_id": A,
        "title": "write docs",
        "done": True,
        "tags": ["docs", "later"],  # truncated to 2, then tags.1 set
        "owner": {"name": "Grace", "team": "docs"},
        "points": 9007199254740993,
    }
    assert "due" in event["fullDocumentBeforeChange"]  # the event itself is left untouched


def test_apply_update_sets_nested_paths_and_array_elements():
    document = {"a": {"b": 1}, "list": [1, 2], "gone": 1}
    description = {
        "updated_fields": {"a.c.d": 2, "list.3": 9, "top": "x"},
        "removed_fields": ["gone", "a.b", "list.0"],
        "truncated_arrays": [],
    }
    assert apply_update(document, description) == {
        "a": {"c": {"d": 2}},
        "list": [None, 2, None, 9],
        "top": "x",
    }


def test_replace_becomes_an_update_with_the_replacing_document():
    change = decode("replace")
    assert change.operation is Operation.UPDATE
    assert change.new == {"_id": B, "title": "replaced", "done": False}
    assert change.old == {"_id": B} and change.meta is None


def test_delete_has_the_key_as_old_and_no_new():
    change = decode("delete")
    assert change.operation is Operation.DELETE
    assert change.new is None and change.old == {"_id": B} and change.key == {"_id": B}
    assert change.row == {"_id": B}


def test_delete_with_a_pre_image_has_the_whole_old_document():
    change = decode("delete_with_pre_image")
    assert change.old == {"_id": B, "title": "replaced", "done": False}


def test_changes_of_one_transaction_share_a_session_and_txn_number_id():
    first, second = decode("delete"), decode("delete_in_same_transaction")
    session = EVENTS["delete"]["lsid"]["id"]
    assert isinstance(session, Binary)
    assert first.transaction == f"{session.as_uuid()}:3"
    assert uuid.UUID(first.transaction.split(":")[0])
    assert first.transaction == second.transaction
    assert first.position != second.position


def test_unknown_event_types_are_skipped():
    assert decode("create_indexes") is None
    assert decode_event({"operationType": "somethingNew", "ns": {"db": "a", "coll": "b"}}, "a.b") \
        is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("drop", "collection app.tasks was dropped; the change stream ended"),
        ("rename", "collection app.tasks was renamed to app.tasks_archive; the change stream"
                   " ended (watch app.tasks_archive to follow it)"),
        ("dropDatabase", "database app was dropped; the change stream ended"),
        ("invalidate", "the change stream of app.tasks was invalidated (its collection was"
                       " dropped or renamed); the change stream ended"),
    ],
)
def test_events_that_end_the_stream_say_why(name, message):
    ended = decode(name)
    assert isinstance(ended, StreamEnded)
    assert ended.message == message and ended.reason == name
    assert ended.final == (name == "invalidate")
    assert ended.position == {"_data": EVENTS[name]["_id"]["_data"]}


def test_positions_are_json_and_ordered_like_the_stream():
    names = ["insert", "update", "update_document_gone", "update_with_pre_image", "replace",
             "delete", "delete_with_pre_image"]
    positions = [decode(name).position for name in names]
    assert json.loads(json.dumps(positions)) == positions
    assert [p["_data"] for p in positions] == sorted(p["_data"] for p in positions)


def test_legacy_binary_resume_tokens_round_trip_as_extended_json():
    token = {"_data": Binary(b"\x82\x01\x02"), "_typeBits": Binary(b"\x40")}
    position = token_position(token)
    assert json.loads(json.dumps(position)) == position
    assert bson.encode(position_token(position)) == bson.encode(token)  # the same BSON
    assert position_token({"_data": "8265", "snapshot": 3}) == {"_data": "8265"}
    with pytest.raises(ConfigurationError, match="not a MongoDB resume token"):
        position_token({"lsn": 12})


# -- operation masks -----------------------------------------------------------------------------

ENDINGS = ["invalidate", "drop", "rename", "dropDatabase"]


@pytest.mark.parametrize(
    ("operation", "types"),
    [
        (Operation.INSERT, ["insert"]),
        (Operation.UPDATE, ["update", "replace"]),
        (Operation.DELETE, ["delete"]),
        (Operation.INSERT | Operation.DELETE, ["insert", "delete"]),
        (ALL, ["insert", "update", "replace", "delete"]),
    ],
)
def test_operation_masks_select_event_types_and_always_the_ends(operation, types):
    assert operation_types(operation) == types + ENDINGS


# -- errors --------------------------------------------------------------------------------------


def failure(code: int, message: str = "boom", labels: list[str] | None = None,
            name: str | None = None) -> OperationFailure:
    details: dict = {"ok": 0, "errmsg": message, "code": code}
    if labels:
        details["errorLabels"] = labels
    if name:
        details["codeName"] = name
    return OperationFailure(message, code=code, details=details)


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


# -- the feed, through a fake at the driver-cursor boundary --------------------------------------


def token(n: int) -> dict:
    return {"_data": f"8265{n:06d}"}


def event(n: int, operation_type: str = "insert", key: int = 1, **fields) -> dict:
    document = {"_id": key, "n": n}
    result = {
        "_id": token(n),
        "operationType": operation_type,
        "ns": {"db": "app", "coll": "tasks"},
        "documentKey": {"_id": key},
        **fields,
    }
    if operation_type in ("insert", "update", "replace"):
        result["fullDocument"] = document
    if operation_type == "update":
        result["updateDescription"] = {"updatedFields": {"n": n}, "removedFields": []}
    return result


class PostBatch:
    """A getMore that returned nothing but moved the stream's postBatchResumeToken."""

    def __init__(self, n: int) -> None:
        self.token = token(n)


class FakeStream:
    """pymongo's ChangeStream as the feed uses it: try_next(), resume_token, close()."""

    def __init__(self, script: list, opened_at: dict | None) -> None:
        self.script = list(script)
        self.resume_token = opened_at
        self.closed = False

    def try_next(self):
        if not self.script:
            return None  # an empty getMore after maxAwaitTimeMS
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, PostBatch):
            self.resume_token = item.token
            return None
        if item is not None:
            self.resume_token = item["_id"]
        return item

    def close(self) -> None:
        self.closed = True


class FakeDatabase:
    name = "app"

    def __init__(self, collections: list[str]) -> None:
        self.collections = collections

    def list_collection_names(self, filter=None):  # noqa: A002 - pymongo's name
        return [name for name in self.collections if name == (filter or {}).get("name", name)]


class FakeCollection:
    """Scripts one stream per watch() call (or raises the exception given instead)."""

    name = "tasks"

    def __init__(self, *scripts, documents=(), exists=True, opened_at=None) -> None:
        self.scripts = list(scripts)
        self.documents = list(documents)
        self.opened_at = opened_at
        self.database = FakeDatabase(["tasks"] if exists else [])
        self.watches: list[dict] = []
        self.streams: list[FakeStream] = []
        self.finds: list[dict] = []

    def watch(self, **kwargs):
        self.watches.append(kwargs)
        script = self.scripts.pop(0) if self.scripts else []
        if isinstance(script, BaseException):
            raise script
        # Like pymongo: the token it was started from, until the server gives a newer one.
        started_from = kwargs.get("start_after") or kwargs.get("resume_after")
        stream = FakeStream(script, self.opened_at or started_from)
        self.streams.append(stream)
        return stream

    def find(self, **kwargs):
        self.finds.append(kwargs)
        return iter([dict(document) for document in self.documents])


def make_feed(collection, operation=ALL, **options) -> MongoChangeFeed:
    options.setdefault("retry", FAST)
    return MongoChangeFeed("app.tasks", operation, connection=collection, **options)


def resume_options(watch: dict) -> dict:
    names = ("resume_after", "start_after", "start_at_operation_time")
    return {name: watch[name] for name in names if name in watch}


def test_the_stream_is_watched_with_the_selected_types_lookup_and_pre_images():
    collection = FakeCollection([event(1)])
    feed = make_feed(collection, Operation.INSERT | Operation.DELETE)
    [change] = list(feed.changes(stop_after=1, timeout=5))
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


def test_pre_images_can_be_required_or_turned_off():
    collection = FakeCollection([event(1)], [event(1)])
    list(make_feed(collection, pre_images="required").changes(stop_after=1, timeout=5))
    list(make_feed(collection, pre_images=False, full_document=None).changes(stop_after=1,
                                                                             timeout=5))
    assert collection.watches[0]["full_document_before_change"] == "required"
    assert "full_document_before_change" not in collection.watches[1]
    assert "full_document" not in collection.watches[1]


def test_servers_without_pre_images_are_watched_without_them():
    too_old = failure(40415, "BSON field '$changeStream.fullDocumentBeforeChange' is an unknown"
                             " field.")
    collection = FakeCollection(too_old, [event(1)])
    [change] = list(make_feed(collection).changes(stop_after=1, timeout=5))
    assert change.position == token(1)
    assert "full_document_before_change" in collection.watches[0]
    assert "full_document_before_change" not in collection.watches[1]


def test_operations_outside_the_mask_are_skipped_and_idle_ticks_are_yielded():
    collection = FakeCollection([event(1, "insert"), None, event(2, "update"), None,
                                 event(3, "delete"), event(4, "createIndexes")])
    feed = make_feed(collection, Operation.DELETE)
    seen = list(feed.changes(ticks=True, timeout=5, stop_after=1))
    assert seen[:2] == [None, None]
    assert [c.operation for c in seen if c is not None] == [Operation.DELETE]
    assert seen[-1].position == token(3)


def test_a_missing_collection_is_watched_with_a_warning(caplog):
    collection = FakeCollection([event(1)], exists=False)
    with caplog.at_level("WARNING", logger="changefeed.mongodb"):
        assert len(list(make_feed(collection).changes(stop_after=1, timeout=5))) == 1
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
    for change in feed.changes(stop_after=2, timeout=5):
        feed.ack(change.position)
    restarted = make_feed(FakeCollection([event(3)]), checkpoint=FileCheckpoint(checkpoint.path))
    assert restarted.acknowledged == token(2)
    list(restarted.changes(stop_after=1, timeout=5))
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
    assert [c.position for c in feed.changes(stop_after=1, timeout=5)] == [token(5)]
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
    changes = list(feed.changes(stop_after=3, timeout=5))
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
    changes = list(feed.changes(stop_after=4, timeout=5))
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
    [change] = list(feed.changes(stop_after=1, timeout=5))
    assert not change.snapshot and collection.finds == []
    assert resume_options(collection.watches[0]) == {"resume_after": token(10)}


def test_an_unfinished_snapshot_is_taken_again_after_a_restart():
    checkpoint = MemoryCheckpoint()
    checkpoint.save("app.tasks", {"_data": token(10)["_data"], "snapshot": 1})
    collection = FakeCollection([], documents=[{"_id": 1}, {"_id": 2}], opened_at=token(20))
    feed = make_feed(collection, prefeed="snapshot", checkpoint=checkpoint)
    changes = list(feed.changes(stop_after=2, timeout=5))
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
        assert by_client._get_collection().database.client is client
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
    assert feed._client is None  # the client the feed made was closed
