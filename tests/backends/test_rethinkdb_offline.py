"""The RethinkDB feed, offline: no server needed (the live tests are test_rethinkdb_live.py).

The feed loop runs against a fake at the driver's boundary only: ``r.connect`` returns a fake
connection that answers the queries the driver hands it (``query.run(conn)`` calls
``conn._start(query)``); everything above it, the driver's query building included, is the
real code. The pure parts have their own tests: decoding and the re-read bookkeeping in
test_rethinkdb_events.py, error classification in test_rethinkdb_errors.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import rethinkdb.net
from rethinkdb import r
from rethinkdb.ast import Changes, Info, ReQLEncoder
from rethinkdb.errors import (
    ReqlAuthError,
    ReqlCursorEmpty,
    ReqlDriverError,
    ReqlOpFailedError,
    ReqlPermissionError,
    ReqlResourceLimitError,
    ReqlRuntimeError,
    ReqlTimeoutError,
)

from changefeed import Change, Operation, Retry, get_changefeed
from changefeed.backends.rethinkdb import ConnectionParams, RethinkChangeFeed, make_position
from changefeed.backends.rethinkdb.connection import (
    open_changes,
    open_connection,
    read_primary_key,
)
from changefeed.checkpoint import MemoryCheckpoint
from changefeed.errors import ConfigurationError, PermanentBackendError

INSERT, UPDATE, DELETE = Operation.INSERT, Operation.UPDATE, Operation.DELETE


# -- connection parameters -----------------------------------------------------------------------


def test_url_defaults_and_parts():
    assert ConnectionParams.from_url("rethinkdb://") == ConnectionParams()
    params = ConnectionParams.from_url("rethinkdb://bob:s%40cret@db.example:29015/app?timeout=5")
    assert (params.host, params.port, params.db) == ("db.example", 29015, "app")
    assert (params.user, params.password, params.timeout) == ("bob", "s@cret", 5.0)
    assert "s@cret" not in repr(params)
    assert ConnectionParams.from_url("rethinkdb://h").port == 28015
    assert ConnectionParams.from_url("rethinkdb://h").db == "test"


@pytest.mark.parametrize("url", ["rethinkdb://h:port/app", "rethinkdb://h/a/b",
                                 "rethinkdb://h/app?timeout=soon", "mongodb://h/app"])
def test_bad_urls_are_configuration_errors(url):
    with pytest.raises(ConfigurationError):
        ConnectionParams.from_url(url)


def test_the_table_name_may_carry_the_database():
    feed = get_changefeed("rethinkdb://h:1/app", "other.tasks", Operation.INSERT)
    assert isinstance(feed, RethinkChangeFeed)
    assert (feed.db, feed.table_name, feed.table) == ("other", "tasks", "other.tasks")
    assert get_changefeed("rethinkdb://h:1/app", "tasks").table == "app.tasks"
    assert RethinkChangeFeed("tasks").table == "test.tasks"
    with pytest.raises(ConfigurationError, match="no table"):
        RethinkChangeFeed("")


def test_a_driver_connection_dispatches_and_is_never_closed_by_the_feed():
    conn = rethinkdb.net.DefaultConnection(
        "db.example", 28015, "app", None, "admin", None, 20, {}, 10
    )  # not connected: the constructor does not open a socket
    feed = get_changefeed(conn, "tasks", Operation.DELETE)
    assert isinstance(feed, RethinkChangeFeed)
    assert feed.table == "app.tasks" and feed.params.where == "db.example:28015"
    closed = []
    conn.close = lambda noreply_wait=True: closed.append(True)  # type: ignore[method-assign]
    feed._conn = conn  # private: as if connected, without a server
    feed.close()
    assert closed == [] and feed._conn is None
    with pytest.raises(ConfigurationError, match="cannot use a dict"):
        RethinkChangeFeed("tasks", connection={"host": "h"})


# -- the feed loop, through a fake driver cursor --------------------------------------------------

IDLE = object()
"""A script item: the cursor's next(wait=...) times out."""


class Gap:
    """A script item: changes made to the table that no open feed sees."""

    def __init__(self, *docs: dict[str, Any]) -> None:
        self.docs = docs


class FakeCursor:
    """A driver cursor: next(wait=...) returns documents, raises ReqlTimeoutError when idle."""

    def __init__(self, server: FakeServer, items: Iterable[Any]) -> None:
        self.server = server
        self.items = deque(items)
        self.closed = False

    def next(self, wait: float | bool = True) -> Any:
        assert isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0
        while self.items:
            item = self.items.popleft()
            if isinstance(item, Gap):
                for doc in item.docs:
                    self.server.apply(doc)
                continue
            if item is IDLE:
                raise ReqlTimeoutError("localhost", 28015)
            if isinstance(item, BaseException):
                raise item
            self.server.apply(item)
            return item
        time.sleep(0.005)  # a read that waits and times out
        raise ReqlTimeoutError("localhost", 28015)

    def close(self) -> None:
        self.closed = True


class FakeConnection:
    """A driver connection to the fake server: ``query.run(conn)`` calls ``_start(query)``."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.closed = False

    def _start(self, term: Any, **global_optargs: Any) -> Any:
        self.server.queries.append(str(term))
        if isinstance(term, Info):
            if self.server.primary_key_error is not None:
                raise self.server.primary_key_error
            return {"primary_key": "id", "name": "tasks"}
        assert isinstance(term, Changes), f"unexpected query {term}"
        _, _, optargs = json.loads(ReQLEncoder().encode(term))  # what goes on the wire
        return self.server.open_changes(optargs["include_initial"])

    def close(self, noreply_wait: bool = True) -> None:
        self.closed = True


class FakeServer:
    """One RethinkDB table and the script of each stream opened on it."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), runs: Iterable[list[Any]] = ()):
        self.rows = {row["id"]: row for row in rows}
        self.runs = deque(runs)
        self.opens: list[bool] = []
        self.connections: list[FakeConnection] = []
        self.cursors: list[FakeCursor] = []
        self.primary_key_error: BaseException | None = None
        self.connect_errors: dict[int, BaseException] = {}
        """Connection attempt number (from 1) -> the error it raises."""
        self.connect_attempts = 0
        self.queries: list[str] = []

    def apply(self, doc: dict[str, Any]) -> None:
        kind = doc.get("type")
        if kind in ("add", "change"):
            self.rows[doc["new_val"]["id"]] = doc["new_val"]
        elif kind == "remove":
            self.rows.pop(doc["old_val"]["id"], None)

    def open_changes(self, include_initial: bool) -> FakeCursor:
        self.opens.append(include_initial)
        items: list[Any] = []
        if include_initial:
            items.append({"type": "state", "state": "initializing"})
            items.extend({"type": "initial", "new_val": row} for row in self.rows.values())
        items.append({"type": "state", "state": "ready"})
        items.extend(self.runs.popleft() if self.runs else [])
        cursor = FakeCursor(self, items)
        self.cursors.append(cursor)
        return cursor

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        server = self

        def connect(**params: Any) -> FakeConnection:
            server.connect_attempts += 1
            if server.connect_attempts in server.connect_errors:
                raise server.connect_errors[server.connect_attempts]
            conn = FakeConnection(server)
            server.connections.append(conn)
            return conn

        monkeypatch.setattr(r, "connect", connect)


FAST = Retry(initial=0.01, maximum=0.02)


def add(id: int, **row: Any) -> dict[str, Any]:
    return {"type": "add", "old_val": None, "new_val": {"id": id, **row}}


def change(old: dict[str, Any], **new: Any) -> dict[str, Any]:
    return {"type": "change", "old_val": old, "new_val": {**old, **new}}


def remove(old: dict[str, Any]) -> dict[str, Any]:
    return {"type": "remove", "old_val": old, "new_val": None}


ROW1 = {"id": 1, "title": "one", "done": False}
ROW2 = {"id": 2, "title": "two", "done": False}
WORKLOAD = [add(3, title="three"), change(ROW1, done=True), remove(ROW2)]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeServer]:
    def make(**options: Any) -> FakeServer:
        fake = FakeServer(**options)
        fake.install(monkeypatch)
        return fake

    return make


def feed_of(operation: int = Operation.INSERT | Operation.UPDATE | Operation.DELETE,
            **options: Any) -> RethinkChangeFeed:
    options.setdefault("retry", FAST)
    return RethinkChangeFeed("app.tasks", operation, connection="rethinkdb://h/app", **options)


def ops(changes: Iterable[Change]) -> list[tuple[Operation, int, bool]]:
    return [(c.operation, c.key["id"], c.snapshot) for c in changes]


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (INSERT, [(INSERT, 3, False)]),
        (UPDATE, [(UPDATE, 1, False)]),
        (DELETE, [(DELETE, 2, False)]),
        (INSERT | DELETE, [(INSERT, 3, False), (DELETE, 2, False)]),
        (UPDATE | DELETE, [(UPDATE, 1, False), (DELETE, 2, False)]),
        (INSERT | UPDATE | DELETE, [(INSERT, 3, False), (UPDATE, 1, False), (DELETE, 2, False)]),
    ],
    ids=lambda v: getattr(v, "names", None) and "|".join(v.names),
)
def test_each_operation_and_masks(server, mask, expected):
    fake = server(rows=[ROW1, ROW2], runs=[WORKLOAD])
    feed = feed_of(mask)
    got = list(feed.changes(idle_timeout=0.1))
    assert ops(got) == expected
    assert fake.opens == [False]  # no prefeed: the table is not read
    assert all(c.table == "app.tasks" and c.committed_at is None for c in got)
    assert fake.cursors[0].closed and fake.connections[0].closed  # closed after the run


def test_positions_increase_and_acknowledging_tells_the_server_nothing(server):
    server(runs=[WORKLOAD])
    checkpoint = MemoryCheckpoint()
    feed = feed_of(checkpoint=checkpoint)
    got = list(feed.changes(idle_timeout=0.1))
    positions = [c.position for c in got]
    assert positions == sorted(positions) and len(set(positions)) == 3
    feed.ack(positions[-1])
    assert checkpoint.load(feed.feed_id) == positions[-1]


def test_idle_ticks_come_from_cursor_timeouts(server):
    server(runs=[[IDLE, add(3), IDLE]])
    feed = feed_of()
    got = list(feed.changes(ticks=True, limit=1))
    assert got[0] is None and isinstance(got[1], Change)  # the ready state is no change


def test_the_wait_given_to_the_cursor_is_the_poll_interval(server, monkeypatch):
    fake = server(runs=[[add(3)]])
    waits: list[Any] = []
    original = FakeCursor.next

    def spy(self: FakeCursor, wait: Any = True) -> Any:
        waits.append(wait)
        return original(self, wait)

    monkeypatch.setattr(FakeCursor, "next", spy)
    list(feed_of(poll_interval=0.25).changes(limit=1))
    assert fake.opens == [False] and set(waits) == {0.25}


def test_an_iterable_prefeed_comes_first(server):
    server(runs=[[add(3)]])
    feed = feed_of(prefeed=["a", "b"])
    assert [getattr(c, "key", c) for c in feed.changes(limit=3)] == ["a", "b", {"id": 3}]


def test_snapshot_prefeed_reads_the_table_then_streams(server, caplog):
    fake = server(rows=[ROW1, ROW2], runs=[[change(ROW1, done=True)]])
    feed = feed_of(Operation.UPDATE, prefeed="snapshot")  # snapshot rows ignore the mask
    with caplog.at_level(logging.INFO, logger="changefeed.rethinkdb"):
        got = list(feed.changes(idle_timeout=0.1))
    assert ops(got) == [(INSERT, 1, True), (INSERT, 2, True), (UPDATE, 1, False)]
    assert got[0].new == ROW1 and got[0].meta is None
    assert fake.opens == [True]
    assert feed.stats.extra["resyncs"] == 0
    assert "snapshot of app.tasks: 2 rows" in caplog.text


def consume(feed: RethinkChangeFeed, **options: Any) -> tuple[list[Change], dict[Any, Any]]:
    """Iterate like a sink that upserts by key: the copy it ends with, and what it saw."""
    seen: list[Change] = []
    copy: dict[Any, Any] = {}
    for c in feed.changes(**options):
        seen.append(c)
        if c.operation == DELETE:
            copy.pop(c.key["id"], None)
        else:
            copy[c.key["id"]] = c.new
    return seen, copy


def test_after_a_dropped_connection_the_feed_reconnects_and_re_reads_the_table(server, caplog):
    fake = server(
        rows=[ROW1, ROW2],
        runs=[
            [add(3, title="three"),
             Gap(change(ROW1, title="one, edited while away"), add(4, title="four")),
             ReqlDriverError("Connection is closed.")],
            [add(5, title="five")],
        ],
    )
    feed = feed_of(prefeed="snapshot")
    with caplog.at_level(logging.WARNING, logger="changefeed"):
        seen, copy = consume(feed, idle_timeout=0.2)
    assert fake.opens == [True, True]  # the second stream re-reads the table
    assert copy == fake.rows  # the upserting consumer converged to the table's state
    assert copy[1]["title"] == "one, edited while away" and copy[4] == {"id": 4, "title": "four"}
    resynced = [c for c in seen if c.meta == {"resync": 1}]
    assert sorted(c.key["id"] for c in resynced) == [1, 2, 3, 4]
    assert all(c.snapshot and c.operation == INSERT for c in resynced)
    assert [c.meta for c in seen if c.snapshot][:2] == [None, None]  # the snapshot prefeed
    assert feed.stats.reconnects == 1 and feed.stats.extra["resyncs"] == 1
    positions = [c.position for c in seen]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("re-read 4 rows" in m and "app.tasks" in m for m in warnings)
    assert len(fake.connections) == 2 and all(c.closed for c in fake.connections)


def test_re_sync_rows_are_emitted_whatever_the_mask(server):
    fake = server(rows=[ROW1], runs=[[ReqlDriverError("Connection is closed.")], [remove(ROW1)]])
    seen = list(feed_of(Operation.DELETE).changes(idle_timeout=0.2))
    assert fake.opens == [False, True]
    assert ops(seen) == [(INSERT, 1, True), (DELETE, 1, False)]


def test_deletes_while_disconnected_can_be_pruned_by_the_re_sync_generation(server):
    """The re-read cannot show a deleted row; the documented recipe still converges."""
    fake = server(
        rows=[ROW1, ROW2],
        runs=[[Gap(remove(ROW2)), ReqlDriverError("Connection is closed.")], [IDLE]],
    )
    feed = feed_of(prefeed="snapshot")
    copy: dict[Any, Any] = {}
    generation: tuple[int, set[Any]] | None = None
    for c in feed.changes(ticks=True, idle_timeout=0.2):
        resync = c.meta.get("resync") if c is not None and c.meta else None
        if generation is not None and resync != generation[0]:
            copy = {k: v for k, v in copy.items() if k in generation[1]}  # re-read complete
            generation = None
        if c is None:
            continue
        if resync is not None:
            generation = generation or (resync, set())
            generation[1].add(c.key["id"])
        copy[c.key["id"]] = c.new
    assert 2 not in fake.rows and copy == fake.rows


def test_resync_off_skips_the_re_read_and_says_changes_were_lost(server, caplog):
    fake = server(
        rows=[ROW1],
        runs=[[Gap(add(4)), ReqlDriverError("Connection is closed.")], [add(5)]],
    )
    with caplog.at_level(logging.WARNING, logger="changefeed.rethinkdb"):
        seen = list(feed_of(resync=False).changes(idle_timeout=0.2))
    assert fake.opens == [False, False]
    assert ops(seen) == [(INSERT, 5, False)]
    assert "made while the feed was disconnected are lost" in caplog.text


def test_a_snapshot_interrupted_before_ready_is_read_again_even_without_resync(server):
    fake = server(rows=[ROW1, ROW2], runs=[[], []])
    open_stream = fake.open_changes

    def drop_during_the_first_read(include_initial: bool) -> FakeCursor:
        cursor = open_stream(include_initial)
        if len(fake.opens) == 1:  # initializing, the first row, then the connection drops
            cursor.items = deque([*list(cursor.items)[:2], ReqlDriverError("Connection lost")])
        return cursor

    fake.open_changes = drop_during_the_first_read  # type: ignore[method-assign]
    seen = list(feed_of(prefeed="snapshot", resync=False).changes(idle_timeout=0.2))
    assert fake.opens == [True, True]
    assert ops(seen) == [(INSERT, 1, True), (INSERT, 1, True), (INSERT, 2, True)]


def test_a_checkpoint_from_an_earlier_run_means_re_sync_on_start(server):
    checkpoint = MemoryCheckpoint()
    checkpoint.save("app.tasks", make_position(1, 1))
    fake = server(rows=[ROW1], runs=[[]])
    seen = list(feed_of(checkpoint=checkpoint).changes(idle_timeout=0.1))
    assert fake.opens == [True]
    assert ops(seen) == [(INSERT, 1, True)] and seen[0].meta == {"resync": 1}
    assert seen[0].position > make_position(1, 1)


@pytest.mark.parametrize(
    "failure",
    [
        {"error": "Changefeed cache over array size limit, skipped 12 elements."},
        ReqlResourceLimitError("Changefeed queue overflowed."),
        ReqlOpFailedError("Changefeed aborted (table unavailable)."),
        ReqlRuntimeError("Connection is closed."),
        ReqlCursorEmpty(),
    ],
    ids=["error document", "queue overflow", "aborted", "closed cursor", "cursor ended"],
)
def test_feed_failures_reconnect_and_re_sync(server, failure):
    fake = server(rows=[ROW1], runs=[[failure], [add(3)]])
    seen = list(feed_of().changes(idle_timeout=0.2))
    assert fake.opens == [False, True]
    assert ops(seen) == [(INSERT, 1, True), (INSERT, 3, False)]


def test_an_unknown_table_is_a_clear_permanent_error(server):
    fake = server()
    fake.primary_key_error = ReqlOpFailedError("Table `app.nope` does not exist.")
    feed = RethinkChangeFeed("app.nope", connection="rethinkdb://h/app", retry=FAST)
    with pytest.raises(ConfigurationError) as info:
        list(feed.changes(timeout=2))
    assert str(info.value) == "table 'nope' does not exist in RethinkDB database 'app'"
    assert fake.opens == [] and feed.stats.reconnects == 0


def test_an_unknown_database_is_a_clear_permanent_error(server):
    fake = server()
    fake.primary_key_error = ReqlOpFailedError("Database `nope` does not exist.")
    message = "database 'nope' does not exist on RethinkDB at h:28015"
    with pytest.raises(ConfigurationError, match=message):
        list(RethinkChangeFeed("nope.t", connection="rethinkdb://h", retry=FAST).changes())


def test_missing_permissions_are_permanent(server):
    fake = server()
    fake.primary_key_error = ReqlPermissionError(
        "User `bob` does not have the required `read` permissions."
    )
    with pytest.raises(PermanentBackendError, match="no permission to read app.tasks"):
        list(feed_of().changes(timeout=2))


def test_a_first_connection_failure_is_permanent_and_names_the_server(server):
    fake = server()
    fake.connect_errors[1] = ReqlDriverError(
        "Could not connect to h:28015. Error: [Errno 111] Connection refused"
    )
    with pytest.raises(PermanentBackendError) as info:
        list(feed_of().changes(timeout=2))
    expected = "cannot connect to RethinkDB at h:28015: [Errno 111] Connection refused"
    assert str(info.value) == expected


def test_a_login_failure_is_permanent(server):
    fake = server()
    fake.connect_errors[1] = ReqlAuthError("Wrong password", "h", 28015)
    with pytest.raises(PermanentBackendError, match="cannot log in to RethinkDB at h:28015 as"):
        list(feed_of().changes(timeout=2))


def test_later_connection_failures_are_retried(server):
    fake = server(rows=[ROW1], runs=[[ReqlDriverError("Connection is closed.")], [add(3)]])
    fake.connect_errors[2] = ReqlTimeoutError("h", 28015)
    feed = feed_of()
    seen = list(feed.changes(idle_timeout=0.2))
    assert fake.connect_attempts == 3 and fake.opens == [False, True]
    assert ops(seen) == [(INSERT, 1, True), (INSERT, 3, False)]
    assert feed.stats.reconnects == 2


def test_a_lost_connection_given_by_the_caller_is_reopened_not_replaced(monkeypatch):
    conn = rethinkdb.net.DefaultConnection("h", 28015, "app", None, "admin", None, 20, {}, 10)
    calls: list[str] = []
    monkeypatch.setattr(conn, "is_open", lambda: False)
    monkeypatch.setattr(conn, "reconnect", lambda noreply_wait=True: calls.append("reconnect"))
    feed = RethinkChangeFeed("tasks", connection=conn)
    assert open_connection(feed.params, conn) is conn and calls == ["reconnect"]


# -- the queries the feed sends --------------------------------------------------------------------


class QueryRecorder:
    """Stands for a driver connection: ``query.run(conn)`` calls ``conn._start(query)``."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.queries: list[str] = []

    def _start(self, term: Any, **global_optargs: Any) -> Any:
        self.queries.append(str(term))
        return self.result


def test_the_queries_the_feed_sends():
    recorder = QueryRecorder({"primary_key": "sku", "name": "stock"})
    assert read_primary_key(recorder, "shop", "stock", "h:28015") == "sku"
    open_changes(recorder, "shop", "stock", include_initial=True, queue_size=1000)
    open_changes(recorder, "shop", "stock", include_initial=False)
    assert recorder.queries == [
        "r.db('shop').table('stock').info()",
        "r.db('shop').table('stock').changes(include_types=True, include_states=True,"
        " include_initial=True, squash=False, changefeed_queue_size=1000)",
        "r.db('shop').table('stock').changes(include_types=True, include_states=True,"
        " include_initial=False, squash=False)",
    ]


def test_a_feed_sends_its_table_and_queue_size(server):
    fake = server(runs=[[add(3)]])
    feed = RethinkChangeFeed("shop.stock", connection="rethinkdb://h/app", queue_size=1000)
    assert [c.key for c in feed.changes(limit=1)] == [{"id": 3}]
    assert fake.queries == [
        "r.db('shop').table('stock').info()",
        "r.db('shop').table('stock').changes(include_types=True, include_states=True,"
        " include_initial=False, squash=False, changefeed_queue_size=1000)",
    ]


def test_ticks_continue_while_only_changes_outside_the_mask_stream_in(server, monkeypatch):
    clock = iter(range(0, 1000))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    server(runs=[[add(n) for n in range(3, 8)]])
    feed = feed_of(Operation.DELETE, poll_interval=0.5)
    stream = feed.run_changefeed()
    assert [next(stream) for _ in range(5)] == [None] * 5  # one tick per skipped insert here
    stream.close()
