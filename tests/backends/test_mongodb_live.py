"""The MongoDB feed against a real server: SecantusDB, or the mongod of CHANGEFEED_TEST_MONGODB_URL.

``make test`` runs these against SecantusDB, a MongoDB-wire server with change streams that the
test setup starts (tests/conftest.py, `mongodb_server`). Change streams need a replica set:
``docker compose up -d mongodb`` runs a single-node mongod, then ``make test-live`` (or
``CHANGEFEED_TEST_MONGODB_URL=mongodb://localhost:27017/?replicaSet=rs0 pytest -m live``) runs
the same tests against it. Where SecantusDB differs from mongod the test skips there, saying
how, and still runs against mongod. Each test works on its own new collection, dropped after.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from feeds import FAST_RETRY
from testservers import SECANTUSDB, Server

from changefeed import ALL, Change, FileCheckpoint, Operation, get_changefeed
from changefeed.backends.mongodb import MongoChangeFeed, StreamEnded, decode_event

pytestmark = [pytest.mark.live]

URL = ""
"""The server's URL, set by `server` for the helpers below."""


@pytest.fixture(scope="module", autouse=True)
def server(mongodb_server: Server) -> Server:
    global URL
    URL = mongodb_server.url
    return mongodb_server


@pytest.fixture(scope="module")
def client(server):
    import pymongo

    client = pymongo.MongoClient(URL, serverSelectionTimeoutMS=5000, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def collection(client):
    """A new, empty collection in the URL's database (or changefeed_test)."""
    database = client[urlsplit(URL).path.strip("/") or "changefeed_test"]
    name = f"tasks_{uuid.uuid4().hex[:8]}"
    created = database.create_collection(name)
    yield created
    created.drop()


def server_version(client) -> tuple[int, ...]:
    return tuple(client.server_info()["versionArray"][:2])


def make_feed(collection, operation=ALL, **options) -> MongoChangeFeed:
    options.setdefault("retry", FAST_RETRY)
    feed = get_changefeed(URL, collection.full_name, operation, **options)
    assert isinstance(feed, MongoChangeFeed)
    return feed


def open_stream(feed: MongoChangeFeed, timeout: float = 30.0) -> Iterator[Change | None]:
    """Start the feed; once it ticks, its change stream is open and sees later writes."""
    changes = feed.changes(ticks=True, timeout=timeout)
    assert next(changes) is None
    return changes


def take(changes: Iterator[Change | None], count: int) -> list[Change]:
    """The next ``count`` changes (ticks skipped); fewer if the feed's timeout ends it."""
    taken: list[Change] = []
    if count == 0:
        return taken
    for change in changes:
        if change is not None:
            taken.append(change)
            if len(taken) == count:
                break
    return taken


def write_insert_update_delete(collection) -> None:
    collection.insert_one({"_id": 1, "name": "one", "n": 1})
    collection.update_one({"_id": 1}, {"$set": {"n": 2}, "$unset": {"name": ""}})
    collection.delete_one({"_id": 1})


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        (ALL, [Operation.INSERT, Operation.UPDATE, Operation.DELETE]),
        (Operation.INSERT, [Operation.INSERT]),
        (Operation.UPDATE, [Operation.UPDATE]),
        (Operation.DELETE, [Operation.DELETE]),
        (Operation.INSERT | Operation.DELETE, [Operation.INSERT, Operation.DELETE]),
    ],
)
def test_each_mask_streams_only_its_operations(collection, operation, expected):
    feed = make_feed(collection, operation)
    changes = open_stream(feed)
    write_insert_update_delete(collection)
    collection.insert_one({"_id": 2, "name": "marker", "n": 0})  # ends the wait for all masks
    collection.update_one({"_id": 2}, {"$set": {"n": 1}})
    collection.delete_one({"_id": 2})
    got = take(changes, 2 * len(expected))
    changes.close()
    assert [c.operation for c in got] == expected * 2
    assert all(c.table == collection.full_name and c.key["_id"] in (1, 2) for c in got)
    assert all(c.committed_at is not None and c.committed_at.tzinfo for c in got)


def test_changes_carry_documents_keys_and_update_descriptions(collection):
    feed = make_feed(collection)
    changes = open_stream(feed)
    write_insert_update_delete(collection)
    insert, update, delete = take(changes, 3)
    changes.close()
    assert insert.new == {"_id": 1, "name": "one", "n": 1} and insert.key == {"_id": 1}
    assert update.new == {"_id": 1, "n": 2} or update.new is None  # looked up, maybe gone
    assert update.meta["update_description"]["updated_fields"] == {"n": 2}
    assert update.meta["update_description"]["removed_fields"] == ["name"]
    assert update.old == {"_id": 1}  # no pre-images on this collection
    assert delete.new is None and delete.old == {"_id": 1}
    positions = [c.position for c in (insert, update, delete)]
    assert all(set(p) == {"_data"} for p in positions)
    assert [p["_data"] for p in positions] == sorted(p["_data"] for p in positions)


def test_real_event_documents_decode(collection):
    """The recorded shapes still hold: decode what the server really sends."""
    with collection.watch(full_document="updateLookup", max_await_time_ms=500) as stream:
        collection.insert_one({"_id": "a", "v": 1})
        collection.replace_one({"_id": "a"}, {"v": 2})
        events = []
        while len(events) < 2:
            event = stream.try_next()
            if event is not None:
                events.append(event)
    insert, replace = (decode_event(e, collection.full_name) for e in events)
    assert events[0]["_id"].keys() == {"_data"} and "clusterTime" in events[0]
    assert insert.operation is Operation.INSERT and insert.new == {"_id": "a", "v": 1}
    assert replace.operation is Operation.UPDATE and replace.new == {"_id": "a", "v": 2}


@pytest.mark.parametrize("chunk", [{}, {"chunk_size": 2}])  # one round trip, or two
def test_snapshot_prefeed_then_stream(collection, chunk):
    collection.insert_many([{"_id": i, "n": i} for i in range(1, 4)])
    feed = make_feed(collection, prefeed="snapshot", **chunk)
    changes = feed.changes(timeout=30)
    snapshot = take(changes, 3)
    collection.insert_one({"_id": 4, "n": 4})
    [streamed] = take(changes, 1)
    changes.close()
    assert all(c.snapshot and c.operation is Operation.INSERT for c in snapshot)
    assert sorted(c.key["_id"] for c in snapshot) == [1, 2, 3]
    assert snapshot[-1].position.get("done") is True
    assert not streamed.snapshot and streamed.new == {"_id": 4, "n": 4}


def test_a_new_feed_resumes_after_the_acknowledged_change(collection, tmp_path):
    path = tmp_path / "checkpoint.json"
    first = make_feed(collection, checkpoint=FileCheckpoint(path))
    changes = open_stream(first)
    collection.insert_many([{"_id": 1}, {"_id": 2}])
    one, two = take(changes, 2)
    first.ack(one.position)  # two is delivered but not acknowledged
    changes.close()
    first.close()
    collection.insert_one({"_id": 3})

    second = make_feed(collection, checkpoint=FileCheckpoint(path))
    assert second.acknowledged == one.position
    resumed = second.changes(timeout=30)
    again = take(resumed, 2)
    resumed.close()
    assert [c.key["_id"] for c in again] == [2, 3]
    assert again[0].position == two.position


def test_pre_images_give_whole_old_documents(client, collection):
    if server_version(client) < (6, 0):
        pytest.skip("pre-images need MongoDB 6.0+")
    collection.database.command(
        "collMod", collection.name, changeStreamPreAndPostImages={"enabled": True}
    )
    collection.insert_one({"_id": 1, "name": "one", "n": 1})
    feed = make_feed(collection, Operation.UPDATE | Operation.DELETE)
    changes = open_stream(feed)
    collection.update_one({"_id": 1}, {"$set": {"n": 2}})
    collection.delete_one({"_id": 1})
    update, delete = take(changes, 2)
    changes.close()
    assert update.old == {"_id": 1, "name": "one", "n": 1}
    # Looked up, or (when the delete came first) rebuilt from the pre-image: the same here.
    assert update.new == {"_id": 1, "name": "one", "n": 2}
    assert update.meta["new_source"] in ("lookup", "pre-image+update")
    assert delete.old == {"_id": 1, "name": "one", "n": 2}


def test_post_images_are_point_in_time(server, client, collection):
    if server_version(client) < (6, 0):
        pytest.skip("post-images need MongoDB 6.0+")
    if server.kind == SECANTUSDB:
        pytest.skip("SecantusDB 0.7.0b3 sends the document as it is at read time as the"
                    " post-image (fullDocument: required), not as of the update; mongod does")
    collection.database.command(
        "collMod", collection.name, changeStreamPreAndPostImages={"enabled": True}
    )
    collection.insert_one({"_id": 1, "n": 1})
    feed = make_feed(collection, Operation.UPDATE, full_document="required")
    changes = open_stream(feed)
    collection.update_one({"_id": 1}, {"$set": {"n": 2}})
    collection.update_one({"_id": 1}, {"$set": {"n": 3}})
    first, second = take(changes, 2)
    changes.close()
    assert first.new == {"_id": 1, "n": 2} and first.meta["new_source"] == "post-image"
    assert second.new == {"_id": 1, "n": 3}


def test_dropping_the_collection_ends_the_feed(collection):
    feed = make_feed(collection)
    changes = open_stream(feed)
    collection.insert_one({"_id": 1})
    collection.drop()
    rest = [c for c in changes if c is not None]
    assert [c.key for c in rest] == [{"_id": 1}]
    assert isinstance(feed.ended, StreamEnded)
    assert feed.ended.message == (
        f"collection {collection.full_name} was dropped; the change stream ended"
    )


def test_a_missing_collection_can_be_watched(client, caplog):
    database = client[urlsplit(URL).path.strip("/") or "changefeed_test"]
    name = f"missing_{uuid.uuid4().hex[:8]}"
    feed = make_feed(database[name])
    with caplog.at_level("WARNING", logger="changefeed.mongodb"):
        changes = open_stream(feed)
    try:
        database[name].insert_one({"_id": 1})
        [change] = take(changes, 1)
        assert change.new == {"_id": 1}
        assert "does not exist (yet)" in caplog.text
    finally:
        changes.close()
        database[name].drop()


def test_a_passed_client_stays_open(client, collection):
    feed = get_changefeed(client, collection.full_name, retry=FAST_RETRY)
    assert list(feed.changes(timeout=1.5)) == []
    assert client.admin.command("ping")["ok"] == 1
