"""One interface over a real database per backend, for the behaviour suite.

A harness owns one fresh table (or collection) with rows ``{key: {"name": str, "n": int}}`` and
can write to it, make feeds of it, and make the server drop the feed's connection. The
PostgreSQL and MongoDB harnesses always run (tests/conftest.py starts PostgreSQL and SecantusDB,
a MongoDB-wire server, unless ``CHANGEFEED_TEST_MONGODB_URL`` names a real mongod); the RethinkDB
harness needs a server named by ``CHANGEFEED_TEST_RETHINKDB_URL`` (``docker compose up -d`` then
``make test-live``).
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

from feeds import FAST_RETRY

from changefeed import Change, get_changefeed

RETHINKDB_ENV = "CHANGEFEED_TEST_RETHINKDB_URL"


class Harness:
    """What the behaviour suite needs of a backend."""

    name = "?"
    key_field = "id"
    resumes_after_restart = True
    """False where the database cannot resume a feed (RethinkDB re-syncs instead)."""
    exact_update_images = True
    """False where an update's ``new`` is read later (MongoDB's updateLookup) and may be None."""
    feed_sees_dropped_connections = True
    """False where the driver itself resumes after `drop_feed_connections` (the feed's own
    reconnect is then not needed, and not counted)."""

    url: str
    table: str

    def feed(self, operation: int, **options: Any):
        options.setdefault("retry", FAST_RETRY)
        return get_changefeed(self.url, self.table, operation, **options)

    def key_of(self, change: Change) -> Any:
        return change.key[self.key_field]

    def fields(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        """A row without its key, to compare rows across backends."""
        if row is None:
            return None
        return {k: v for k, v in row.items() if k != self.key_field}

    # implemented per backend
    def insert(self, key: int, name: str, n: int) -> None:
        raise NotImplementedError

    def update(self, key: int, n: int) -> None:
        raise NotImplementedError

    def delete(self, key: int) -> None:
        raise NotImplementedError

    def rows(self) -> dict[Any, dict[str, Any]]:
        raise NotImplementedError

    def drop_feed_connections(self, feed: Any) -> int:
        """Make the server end ``feed``'s connection (or query); return how many it ended."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class PostgresHarness(Harness):
    name = "postgresql"

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.url = dsn
        self.table = "items"
        self.slot = f"behaviour_{uuid.uuid4().hex[:8]}"
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, n int)")

    def feed(self, operation: int, **options: Any):
        options.setdefault("slot", self.slot)  # the same slot for every feed of this table
        return super().feed(operation, **options)

    def insert(self, key: int, name: str, n: int) -> None:
        self.conn.execute("INSERT INTO items VALUES (%s, %s, %s)", [key, name, n])

    def update(self, key: int, n: int) -> None:
        self.conn.execute("UPDATE items SET n = %s WHERE id = %s", [n, key])

    def delete(self, key: int) -> None:
        self.conn.execute("DELETE FROM items WHERE id = %s", [key])

    def rows(self) -> dict[Any, dict[str, Any]]:
        return {
            key: {"name": name, "n": n}
            for key, name, n in self.conn.execute("SELECT id, name, n FROM items").fetchall()
        }

    def drop_feed_connections(self, feed: Any) -> int:
        ended = self.conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = current_database() AND active"
        ).fetchall()
        return len(ended)

    def close(self) -> None:
        self.conn.close()


class MongoHarness(Harness):
    name = "mongodb"
    key_field = "_id"
    exact_update_images = False

    def __init__(self, server: Any) -> None:
        import pymongo

        self.url = server.url
        self.server = server
        self.feed_sees_dropped_connections = server.kind != "secantusdb"
        """The `testservers.Server`: SecantusDB started by the tests, or an external mongod."""
        self.client: Any = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=5000)
        database = urlsplit(self.url).path.strip("/") or "changefeed_test"
        self.collection_name = f"items_{uuid.uuid4().hex[:8]}"
        self.table = f"{database}.{self.collection_name}"
        self.database = self.client[database]
        self.database.create_collection(self.collection_name)
        self.collection = self.database[self.collection_name]

    def insert(self, key: int, name: str, n: int) -> None:
        self.collection.insert_one({"_id": key, "name": name, "n": n})

    def update(self, key: int, n: int) -> None:
        self.collection.update_one({"_id": key}, {"$set": {"n": n}})

    def delete(self, key: int) -> None:
        self.collection.delete_one({"_id": key})

    def rows(self) -> dict[Any, dict[str, Any]]:
        return {doc.pop("_id"): doc for doc in self.collection.find()}

    def drop_feed_connections(self, feed: Any) -> int:
        """Kill the change stream's cursor on the server, as a failover or restart would.

        SecantusDB lists no running getMore to kill, only the idle cursor, and pymongo resumes
        after CursorNotFound by itself: there the server is restarted instead, which closes
        every connection (pymongo resumes after that too: `feed_sees_dropped_connections`).
        """
        if self.server.kind == "secantusdb":
            self.server.restart()
            return 1
        admin = self.client.admin
        namespace = self.table
        cursors: list[int] = []
        operations: list[int] = []
        # mongod lists idle cursors in the $currentOp stage; SecantusDB only in the currentOp
        # command, with the cursor id at the top level.
        listed = list(admin.aggregate([{"$currentOp": {"idleCursors": True, "allUsers": True}}]))
        listed += admin.command("currentOp", {"idleCursors": True}).get("inprog", [])
        for op in listed:
            if op.get("ns") != namespace:
                continue
            if op.get("type") == "idleCursor":
                cursor_id = op["cursor"]["cursorId"] if "cursor" in op else op.get("cursorId")
                if cursor_id is not None and cursor_id not in cursors:
                    cursors.append(cursor_id)
            elif op.get("op") == "getmore" and "opid" in op and op["opid"] not in operations:
                operations.append(op["opid"])
        for opid in operations:
            admin.command("killOp", op=opid)
        if cursors:
            self.database.command("killCursors", self.collection_name, cursors=cursors)
        return len(cursors) + len(operations)

    def close(self) -> None:
        self.collection.drop()
        self.client.close()


class RethinkHarness(Harness):
    name = "rethinkdb"
    resumes_after_restart = False

    def __init__(self, url: str) -> None:
        from rethinkdb import RethinkDB

        self.r = r = RethinkDB()
        parts = urlsplit(url)
        self.database = parts.path.strip("/") or "test"
        self.conn = r.connect(host=parts.hostname or "localhost", port=parts.port or 28015)
        if self.database not in r.db_list().run(self.conn):
            r.db_create(self.database).run(self.conn)
        self.table = f"items_{uuid.uuid4().hex[:8]}"
        r.db(self.database).table_create(self.table).run(self.conn)
        self.url = url
        self.items = r.db(self.database).table(self.table)

    def insert(self, key: int, name: str, n: int) -> None:
        self.items.insert({"id": key, "name": name, "n": n}).run(self.conn)

    def update(self, key: int, n: int) -> None:
        self.items.get(key).update({"n": n}).run(self.conn)

    def delete(self, key: int) -> None:
        self.items.get(key).delete().run(self.conn)

    def rows(self) -> dict[Any, dict[str, Any]]:
        return {doc.pop("id"): doc for doc in self.items.run(self.conn)}

    def drop_feed_connections(self, feed: Any) -> int:
        """Cut the feed's TCP connection under it, as a server going away would.

        RethinkDB has no command that closes another client's connection (deleting a query
        from ``rethinkdb.jobs`` interrupts a changefeed only when it next emits), so the
        socket is shut down from our side.
        """
        conn = getattr(feed, "_conn", None)
        if conn is None:
            return 0
        conn._instance._socket._socket.shutdown(socket.SHUT_RDWR)
        return 1

    def close(self) -> None:
        self.r.db(self.database).table_drop(self.table).run(self.conn)
        self.conn.close()


def available_backends() -> list[tuple[str, str | None]]:
    """(backend, reason to skip or None) for the parametrised suite."""
    return [
        ("postgresql", None),
        ("mongodb", None),  # SecantusDB, or $CHANGEFEED_TEST_MONGODB_URL (conftest.py)
        ("rethinkdb", None if os.environ.get(RETHINKDB_ENV) else
         f"set {RETHINKDB_ENV} (docker compose up -d rethinkdb; make test-live) to run it"),
    ]
