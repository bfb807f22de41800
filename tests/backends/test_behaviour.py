"""One behaviour suite for every backend, on real servers.

PostgreSQL and MongoDB always run: tests/conftest.py starts PostgreSQL, and SecantusDB (a
MongoDB-wire server from PyPI) unless ``CHANGEFEED_TEST_MONGODB_URL`` names a real mongod.
RethinkDB runs when ``CHANGEFEED_TEST_RETHINKDB_URL`` names a server (``docker compose up -d``
then ``make test-live``); otherwise its cases skip, saying how to run them.
Where a database cannot do what PostgreSQL does, the test says so and checks what it does
instead (RethinkDB cannot resume a feed: it re-reads the table after a reconnect).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import (
    RETHINKDB_ENV,
    Harness,
    MongoHarness,
    PostgresHarness,
    RethinkHarness,
    available_backends,
)

from changefeed import ALL, Change, FileCheckpoint, Operation
from changefeed.testing import insert as make_insert

MASKS = [Operation(value) for value in range(1, 8)]


@pytest.fixture(params=[
    pytest.param(name, marks=[pytest.mark.skipif(reason is not None, reason=reason or "")]
                 + ([pytest.mark.postgres] if name == "postgresql" else [pytest.mark.live]))
    for name, reason in available_backends()
])
def backend(request) -> Iterator[Harness]:
    import os

    if request.param == "postgresql":
        harness: Harness = PostgresHarness(request.getfixturevalue("pg_dsn"))
    elif request.param == "mongodb":
        harness = MongoHarness(request.getfixturevalue("mongodb_server"))
    else:
        harness = RethinkHarness(os.environ[RETHINKDB_ENV])
    try:
        yield harness
    finally:
        harness.close()


def consume(feed, action: Callable[[], Any] | None = None, *, expect: int, settle: float = 0.7,
            timeout: float = 45) -> list[Change]:
    """Read ``feed`` (acknowledging each change); once its stream is open (its first idle
    tick), run ``action``; stop when ``expect`` changes came and then nothing for ``settle``
    seconds (so extra changes are caught too), or after ``timeout``."""
    changes: list[Change] = []
    acted = action is None
    last = time.monotonic()
    for item in feed.changes(ticks=True, timeout=timeout):
        now = time.monotonic()
        if item is None:
            if not acted:
                action()
                acted = True
                last = time.monotonic()
            elif len(changes) >= expect and now - last >= settle:
                break
            continue
        changes.append(item)
        feed.ack(item.position)
        last = now
    return changes


def apply(changes: list[Change], harness: Harness) -> dict[Any, dict[str, Any]]:
    """The table a consumer upserting and deleting by key would hold after ``changes``."""
    state: dict[Any, dict[str, Any]] = {}
    for change in changes:
        key = harness.key_of(change)
        if change.operation is Operation.DELETE:
            state.pop(key, None)
        else:
            state[key] = harness.fields(change.new)
    return state


@pytest.mark.parametrize("mask", MASKS, ids=lambda mask: "|".join(mask.names))
def test_each_operation_and_every_combined_mask(backend, mask):
    def write() -> None:
        backend.insert(1, "a", 1)
        backend.update(1, 2)
        backend.delete(1)
        backend.insert(2, "b", 1)

    script = [(Operation.INSERT, 1), (Operation.UPDATE, 1), (Operation.DELETE, 1),
              (Operation.INSERT, 2)]
    expected = [(op, key) for op, key in script if op & mask]
    changes = consume(backend.feed(mask), write, expect=len(expected))

    assert [(c.operation, backend.key_of(c)) for c in changes] == expected
    for change in changes:
        assert change.table.endswith(backend.table.rpartition(".")[2])
        assert not change.snapshot
        if change.operation is Operation.INSERT and backend.key_of(change) == 1:
            assert backend.fields(change.new) == {"name": "a", "n": 1}
        if change.operation is Operation.UPDATE:
            if backend.exact_update_images:
                assert backend.fields(change.new) == {"name": "a", "n": 2}
            else:  # looked up when sent: the row was deleted by then
                assert change.new is None or backend.fields(change.new) == {"name": "a", "n": 2}
        if change.operation is Operation.DELETE:
            assert change.new is None


def test_prefeed_iterable_comes_first(backend):
    prefeed = [make_insert("seed", {"id": -1}), make_insert("seed", {"id": -2})]
    changes = consume(backend.feed(ALL, prefeed=prefeed), lambda: backend.insert(1, "a", 1),
                      expect=3)
    assert changes[:2] == prefeed
    assert [(c.operation, backend.key_of(c)) for c in changes[2:]] == [(Operation.INSERT, 1)]


def test_snapshot_prefeed_then_the_stream(backend):
    for key in (1, 2, 3):
        backend.insert(key, f"row {key}", 0)
    backend.update(2, 20)

    def write() -> None:
        backend.insert(4, "row 4", 0)
        backend.update(1, 10)

    changes = consume(backend.feed(ALL, prefeed="snapshot"), write, expect=4)
    snapshot = [c for c in changes if c.snapshot]
    stream = [c for c in changes if not c.snapshot]
    assert all(c.operation is Operation.INSERT for c in snapshot)
    # The snapshot may come first (a consistent read handed over to the stream) or in key
    # chunks interleaved with the stream (PostgreSQL, DBLog): then a row the stream changed
    # while its chunk was read comes from the stream only, and a row the stream gave before
    # its chunk was read may come again, as it is then. A snapshot row never takes a row back
    # to an older value, and a consumer applying everything in order ends with the table.
    got = {backend.key_of(c): backend.fields(c.new) for c in snapshot}
    assert got[2] == {"name": "row 2", "n": 20} and got[3] == {"name": "row 3", "n": 0}
    for index, change in enumerate(changes):
        if change.snapshot:
            earlier = apply(changes[:index], backend)
            key = backend.key_of(change)
            assert earlier.get(key, backend.fields(change.new)) == backend.fields(change.new)
    assert [(c.operation, backend.key_of(c)) for c in stream] == [
        (Operation.INSERT, 4), (Operation.UPDATE, 1),
    ]
    assert apply(changes, backend) == backend.rows()


def test_reconnects_after_the_server_drops_the_connection(backend):
    dropped = []
    feed = backend.feed(ALL)

    def write() -> None:
        for key in range(1, 6):
            backend.insert(key, f"row {key}", 0)
        backend.delete(2)
        time.sleep(0.3)  # let the feed read some of them
        dropped.append(backend.drop_feed_connections(feed))
        for key in range(6, 11):
            backend.insert(key, f"row {key}", 0)
        backend.update(1, 1)

    changes = consume(feed, write, expect=12)

    assert dropped[0] >= 1, "the server had no feed connection to drop"
    if backend.feed_sees_dropped_connections:
        assert feed.stats.reconnects >= 1
    assert apply(changes, backend) == backend.rows()  # the consumer converged
    if backend.resumes_after_restart:
        # Resumable backends lose no change and keep commit order (repeats are allowed).
        live = [(c.operation, backend.key_of(c)) for c in changes if not c.snapshot]
        firsts = list(dict.fromkeys(live))
        assert firsts == [(Operation.INSERT, key) for key in range(1, 6)] + [
            (Operation.DELETE, 2)] + [(Operation.INSERT, key) for key in range(6, 11)] + [
            (Operation.UPDATE, 1)]


def test_resume_after_a_process_restart(backend, tmp_path):
    if not backend.resumes_after_restart:
        pytest.skip(f"{backend.name} cannot resume a feed; see the re-sync test")
    checkpoint = tmp_path / "checkpoint.json"
    first = consume(backend.feed(ALL, checkpoint=FileCheckpoint(checkpoint)),
                    lambda: [backend.insert(key, "x", 0) for key in (1, 2, 3)], expect=3)
    assert [backend.key_of(c) for c in first] == [1, 2, 3]

    # While no feed runs (as after a crash), the table changes.
    backend.insert(4, "x", 0)
    backend.update(1, 5)
    backend.delete(2)

    # A new feed object, with nothing in memory but the checkpoint file, takes up from there.
    second = consume(backend.feed(ALL, checkpoint=FileCheckpoint(checkpoint)), expect=3)
    assert [(c.operation, backend.key_of(c)) for c in second] == [
        (Operation.INSERT, 4), (Operation.UPDATE, 1), (Operation.DELETE, 2)]
    assert apply(first + second, backend) == backend.rows()


def test_resync_after_a_reconnect(backend):
    if backend.resumes_after_restart:
        pytest.skip(f"{backend.name} resumes from its position instead of re-reading the table")
    feed = backend.feed(ALL)

    def write() -> None:
        backend.insert(1, "a", 0)
        backend.insert(2, "b", 0)
        time.sleep(0.3)  # let the feed read them
        assert backend.drop_feed_connections(feed) >= 1
        backend.update(1, 7)   # while the feed is away: only the re-read can carry these
        backend.insert(3, "c", 0)

    changes = consume(feed, write, expect=5)
    assert feed.stats.reconnects >= 1
    assert any(c.snapshot for c in changes[2:]), "no re-read after the reconnect"
    # A delete while the feed is away cannot be seen (RethinkDB keeps no history): the README
    # says so; rows that exist converge.
    assert apply(changes, backend) == backend.rows() == {
        1: {"name": "a", "n": 7}, 2: {"name": "b", "n": 0}, 3: {"name": "c", "n": 0}}
