"""The RethinkDB backend against a live server, skipped unless CHANGEFEED_TEST_RETHINKDB_URL is set.

Each test gets a fresh database, dropped afterwards. The feed runs in a thread that collects
its changes; a tick (None) from ``changes(ticks=True)`` means the changefeed cursor is open.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from rethinkdb import r
from waiting import wait_until

from changefeed import Change, Operation, Retry, get_changefeed
from changefeed.backends.rethinkdb import ConnectionParams, RethinkChangeFeed
from changefeed.errors import ConfigurationError

URL = os.environ.get("CHANGEFEED_TEST_RETHINKDB_URL", "")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not URL,
        reason="set CHANGEFEED_TEST_RETHINKDB_URL (e.g. `docker compose up -d rethinkdb` then"
        " `make test-live`) to run the live RethinkDB tests",
    ),
]

INSERT, UPDATE, DELETE = Operation.INSERT, Operation.UPDATE, Operation.DELETE
ALL = INSERT | UPDATE | DELETE
AT = datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)


@pytest.fixture
def params() -> ConnectionParams:
    return ConnectionParams.from_url(URL)


def connect(params: ConnectionParams, db: str) -> Any:
    return r.connect(host=params.host, port=params.port, db=db, user=params.user,
                     password=params.password, timeout=params.timeout)


@pytest.fixture
def db(params: ConnectionParams) -> Iterator[str]:
    """A new database with an empty ``tasks`` table, dropped afterwards."""
    name = f"changefeed_test_{uuid.uuid4().hex[:12]}"
    conn = connect(params, params.db)
    try:
        r.db_create(name).run(conn)
        r.db(name).table_create("tasks").run(conn)
        r.db(name).table("tasks").wait().run(conn)
        yield name
    finally:
        r.db_drop(name).run(conn)
        conn.close(noreply_wait=False)


@pytest.fixture
def conn(params: ConnectionParams, db: str) -> Iterator[Any]:
    connection = connect(params, db)
    yield connection
    connection.close(noreply_wait=False)


@pytest.fixture
def url(params: ConnectionParams, db: str) -> str:
    auth = ""
    if params.user != "admin" or params.password:
        from urllib.parse import quote

        auth = f"{quote(params.user, safe='')}:{quote(params.password, safe='')}@"
    return f"rethinkdb://{auth}{params.host}:{params.port}/{db}"


class Collector:
    """Runs ``feed.changes(ticks=True)`` in a thread; the changes go to a queue."""

    def __init__(self, feed: RethinkChangeFeed) -> None:
        self.feed = feed
        self.changes: queue.Queue[Change] = queue.Queue()
        self.streaming = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.streaming.wait(30), "the feed did not start streaming"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            for item in self.feed.changes(ticks=True, timeout=120):
                if item is None:
                    self.streaming.set()
                else:
                    self.changes.put(item)
        except BaseException as exc:  # handed to the test thread
            self.error = exc
            self.streaming.set()

    def take(self, count: int, timeout: float = 15) -> list[Change]:
        """Exactly ``count`` changes (fails after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        got: list[Change] = []
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if self.error is not None:
                raise self.error
            assert remaining > 0, f"only {len(got)} of {count} changes came: {got}"
            try:
                got.append(self.changes.get(timeout=min(remaining, 0.5)))
            except queue.Empty:
                pass
        return got

    def quiet(self, seconds: float = 1.5) -> list[Change]:
        """Whatever arrives until nothing did for ``seconds``."""
        got: list[Change] = []
        while True:
            try:
                got.append(self.changes.get(timeout=seconds))
            except queue.Empty:
                return got

    def stop(self) -> None:
        self.feed.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def workload(conn: Any) -> None:
    tasks = r.table("tasks")
    tasks.insert({"id": 1, "title": "write docs", "tags": ["docs"], "owner": {"name": "Ada"},
                  "due": r.epoch_time(AT.timestamp())}).run(conn)
    tasks.get(1).update({"done": True}).run(conn)
    tasks.get(1).delete().run(conn)


def summary(changes: list[Change]) -> list[tuple[Operation, Any, bool]]:
    return [(c.operation, c.key["id"], c.snapshot) for c in changes]


def test_each_operation(url: str, db: str, conn: Any) -> None:
    collector = Collector(RethinkChangeFeed("tasks", ALL, connection=url))
    try:
        workload(conn)
        insert, update, delete = collector.take(3)
    finally:
        collector.stop()
    assert summary([insert, update, delete]) == [(INSERT, 1, False), (UPDATE, 1, False),
                                                 (DELETE, 1, False)]
    assert insert.table == f"{db}.tasks" and insert.key == {"id": 1}
    assert insert.new["owner"] == {"name": "Ada"} and insert.new["tags"] == ["docs"]
    assert insert.new["due"] == AT
    assert update.old == insert.new  # RethinkDB sends the whole old row
    assert update.new == {**insert.new, "done": True}
    assert delete.new is None and delete.old == update.new
    assert all(c.committed_at is None for c in (insert, update, delete))
    assert insert.position < update.position < delete.position


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (INSERT, [INSERT]),
        (UPDATE, [UPDATE]),
        (DELETE, [DELETE]),
        (INSERT | DELETE, [INSERT, DELETE]),
        (UPDATE | DELETE, [UPDATE, DELETE]),
    ],
)
def test_masks(url: str, conn: Any, mask: Operation, expected: list[Operation]) -> None:
    collector = Collector(RethinkChangeFeed("tasks", mask, connection=url))
    try:
        workload(conn)
        got = collector.quiet()
    finally:
        collector.stop()
    assert [c.operation for c in got] == expected


def test_a_driver_connection_works_and_stays_open(db: str, conn: Any, params) -> None:
    own = connect(params, db)
    try:
        feed = get_changefeed(own, "tasks", INSERT)
        assert isinstance(feed, RethinkChangeFeed) and feed.table == f"{db}.tasks"
        collector = Collector(feed)
        try:
            r.table("tasks").insert({"id": "a"}).run(conn)
            (change,) = collector.take(1)
        finally:
            collector.stop()
        assert change.key == {"id": "a"}
        assert own.is_open()  # the feed closes only connections it opened
    finally:
        own.close(noreply_wait=False)


def test_snapshot_prefeed(url: str, conn: Any) -> None:
    r.table("tasks").insert([{"id": 1, "n": 1}, {"id": 2, "n": 2}]).run(conn)
    feed = RethinkChangeFeed("tasks", UPDATE, prefeed="snapshot", connection=url)
    collector = Collector(feed)
    try:
        snapshot = collector.take(2)
        r.table("tasks").insert({"id": 3, "n": 3}).run(conn)  # not in the mask
        r.table("tasks").get(1).update({"n": 10}).run(conn)
        (update,) = collector.take(1)
    finally:
        collector.stop()
    assert sorted(summary(snapshot)) == [(INSERT, 1, True), (INSERT, 2, True)]
    assert {c.key["id"]: c.new for c in snapshot} == {1: {"id": 1, "n": 1}, 2: {"id": 2, "n": 2}}
    assert summary([update]) == [(UPDATE, 1, False)] and update.old == {"id": 1, "n": 1}
    assert feed.stats.extra["resyncs"] == 0


def test_re_sync_after_the_connection_is_closed_under_the_feed(url: str, conn: Any) -> None:
    tasks = r.table("tasks")
    tasks.insert([{"id": 1, "title": "one"}, {"id": 2, "title": "two"}]).run(conn)
    # A long enough backoff that the writes below surely happen while the feed is away.
    feed = RethinkChangeFeed("tasks", ALL, connection=url, retry=Retry(initial=4, maximum=4))
    collector = Collector(feed)
    try:
        tasks.insert({"id": 3, "title": "three"}).run(conn)
        assert summary(collector.take(1)) == [(INSERT, 3, False)]

        # Drop the feed's connection as the network would: its socket goes away.
        feed._conn._instance._socket._socket.shutdown(socket.SHUT_RDWR)
        tasks.get(1).update({"title": "one, edited while away"}).run(conn)
        tasks.insert({"id": 4, "title": "four"}).run(conn)
        tasks.get(2).delete().run(conn)

        resynced = collector.take(3, timeout=30)
        wait_until(lambda: feed.stats.extra["resyncs"] >= 1, "the re-read to complete", 10)
        tasks.insert({"id": 5, "title": "five"}).run(conn)
        (after,) = collector.take(1)
    finally:
        collector.stop()

    assert feed.stats.reconnects >= 1 and feed.stats.extra["resyncs"] == 1
    assert all(c.snapshot and c.operation == INSERT and c.meta == {"resync": 1} for c in resynced)
    rows = {c.key["id"]: c.new for c in resynced}
    truth = {row["id"]: row for row in tasks.run(conn)}
    assert rows == {k: v for k, v in truth.items() if k != 5}
    assert rows[1]["title"] == "one, edited while away" and 2 not in rows
    assert summary([after]) == [(INSERT, 5, False)]
    assert after.position > max(c.position for c in resynced)


def test_an_unknown_table_is_a_clear_error(url: str, db: str) -> None:
    feed = RethinkChangeFeed("nope", connection=url)
    with pytest.raises(ConfigurationError) as info:
        list(feed.changes(timeout=20))
    assert str(info.value) == f"table 'nope' does not exist in RethinkDB database {db!r}"
