"""The MongoDB change event decoder, without a server.

It runs on change event documents in the shapes of MongoDB's change events reference
(recorded/mongodb_events.json, loaded with bson.json_util so Timestamps, ObjectIds, dates and
Decimal128 are real bson values).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from bson import Binary, Decimal128, Int64, ObjectId, json_util

from changefeed import ALL, Change, Operation
from changefeed.backends.mongodb.events import (
    StreamEnded,
    apply_update,
    decode_event,
    operation_types,
    snapshot_change,
)

RECORDED = json_util.loads(
    (Path(__file__).parent / "recorded" / "mongodb_events.json").read_text()
)
EVENTS = RECORDED["events"]
A = ObjectId("6553f0ff1a2b3c4d5e6f7081")
B = ObjectId("6553f0ff1a2b3c4d5e6f7082")


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


def test_apply_update_truncates_arrays_first_and_leaves_the_document_untouched():
    document = {"tags": ["a", "b", "c", "d"], "deep": {"list": [1, 2, 3]}}
    description = {
        "updated_fields": {"tags.1": "B"},
        "removed_fields": ["missing.path", "deep.nothing"],
        "truncated_arrays": [{"field": "tags", "newSize": 2}, {"field": "deep.list",
                                                                "newSize": 0}],
    }
    assert apply_update(document, description) == {"tags": ["a", "B"], "deep": {"list": []}}
    assert document == {"tags": ["a", "b", "c", "d"], "deep": {"list": [1, 2, 3]}}


def test_apply_update_of_an_empty_description_is_a_copy():
    document = {"_id": 1, "nested": {"a": 1}}
    result = apply_update(document, {})
    assert result == document and result["nested"] is not document["nested"]


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



def test_an_invalidate_without_a_namespace_names_the_watched_collection():
    ended = decode_event({"_id": {"_data": "8265"}, "operationType": "invalidate"}, "app.jobs")
    assert isinstance(ended, StreamEnded) and ended.final
    assert ended.message.startswith("the change stream of app.jobs was invalidated")


def test_a_snapshot_document_becomes_a_snapshot_insert_keyed_by_id():
    document = {"_id": A, "title": "write docs"}
    change = snapshot_change(document, "app.tasks", {"_data": "8265", "snapshot": 1})
    assert change.operation is Operation.INSERT and change.snapshot
    assert change.new == document and change.old is None and change.key == {"_id": A}
    assert change.position == {"_data": "8265", "snapshot": 1}
    assert change.committed_at is None and change.transaction is None


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

