"""The core loop: prefeed, operation mask, acknowledgement, reconnect with backoff, resume."""

import threading
import time

import pytest
from multipipes import Node, Pipe, Pipeline
from waiting import wait_until

from changefeed import (
    ChangeFeed,
    ConfigurationError,
    FileCheckpoint,
    MemoryCheckpoint,
    Operation,
    PermanentBackendError,
    Retry,
    TransientBackendError,
    get_changefeed,
    pipelines,
)
from changefeed.testing import ListSink, MemoryFeed, delete, insert, update

CHANGES = [
    insert("t", {"id": 1}),
    update("t", {"id": 1, "v": 2}, {"id": 1}),
    delete("t", {"id": 1}),
]


@pytest.mark.parametrize("mask", range(1, 8))
def test_every_operation_mask_emits_exactly_its_operations(mask):
    feed = MemoryFeed("t", mask, changes=CHANGES)
    got = [change.operation for change in feed.changes()]
    assert got == [c.operation for c in CHANGES if c.operation & mask]
    assert got, "every non-empty mask matches one of the three changes"


def test_empty_mask_is_rejected():
    with pytest.raises(ConfigurationError):
        MemoryFeed("t", 0)


def test_prefeed_is_replayed_before_the_stream():
    feed = MemoryFeed("t", changes=CHANGES[:1], prefeed=["a", "b"])
    assert list(feed.changes())[:2] == ["a", "b"]


def test_a_limit_and_a_timeout_end_an_endless_feed():
    feed = MemoryFeed("t", changes=CHANGES, endless=True)
    assert len(list(feed.changes(limit=2))) == 2
    assert list(MemoryFeed("t", endless=True).changes(timeout=0.3)) == []


def test_iteration_acknowledges_the_previous_change_and_resumes_after_it():
    checkpoint = MemoryCheckpoint()
    feed = MemoryFeed("t", changes=CHANGES, checkpoint=checkpoint)
    iterator = iter(feed)
    next(iterator)
    next(iterator)  # asking for the second acknowledges the first
    assert checkpoint.load("t") == 1
    resumed = MemoryFeed("t", changes=CHANGES, checkpoint=checkpoint)
    assert [c.position for c in resumed.changes()] == [2, 3]


class FlakyFeed(MemoryFeed):
    """Raises after `fail_at` changes, `fail_times` times, like a dropped connection."""

    def __init__(self, *args, fail_times, fail_at=1, error=TransientBackendError, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_times = fail_times
        self.fail_at = fail_at
        self.error = error
        self.connects = 0

    def run_changefeed(self):
        self.connects += 1
        for number, change in enumerate(super().run_changefeed()):
            if number == self.fail_at and self.fail_times:
                self.fail_times -= 1
                raise self.error("server closed the connection")
            yield change


def test_transient_errors_reconnect_and_resume_from_the_acknowledged_position():
    feed = FlakyFeed("t", changes=CHANGES, fail_times=2, retry=Retry(initial=0.01))
    delivered = []
    for change in feed.changes():
        delivered.append(change.position)
        feed.ack(change.position)
    assert delivered == [1, 2, 3]
    assert feed.connects == 3
    assert feed.stats.reconnects == 2


def test_unacknowledged_changes_are_delivered_again_after_a_reconnect():
    feed = FlakyFeed("t", changes=CHANGES, fail_times=1, retry=Retry(initial=0.01))
    assert [c.position for c in feed.changes()] == [1, 1, 2, 3]


def read_through_changes(feed, **bounds):
    return list(feed.changes(**bounds))


def read_through_a_pipeline(feed, **bounds):
    sink = ListSink()
    pipelines.Pipeline(feed, [], sink=sink).run(**bounds)
    return sink.items


@pytest.mark.parametrize("read", [read_through_changes, read_through_a_pipeline])
@pytest.mark.parametrize("end", ["timeout", "stop"])
def test_a_deadline_or_a_stop_ends_the_wait_to_reconnect(read, end):
    feed = FlakyFeed("t", changes=CHANGES, fail_times=1, fail_at=0,
                     retry=Retry(initial=60, maximum=60))
    bounds = {"timeout": 0.5} if end == "timeout" else {}
    if end == "stop":
        threading.Timer(0.5, feed.stop).start()
    started = time.monotonic()
    assert read(feed, **bounds) == []  # it failed before the first change and waits a minute
    assert time.monotonic() - started < 10
    assert feed.stats.reconnects == 1 and feed.connects == 1


class FirstConnectionFails(MemoryFeed):
    """Its first connection fails (after a tick with ``tick_first``: it was streaming, though it
    never called mark_connected() itself); the next ones stream."""

    def __init__(self, *args, tick_first, **kwargs):
        super().__init__(*args, **kwargs)
        self.tick_first = tick_first
        self.connects = 0

    def run_changefeed(self):
        self.connects += 1
        if self.connects == 1:
            if self.tick_first:
                yield None
            raise TransientBackendError("connection refused")
        yield from super().run_changefeed()


def test_a_transient_failure_before_the_server_was_ever_reached_ends_the_feed():
    feed = FirstConnectionFails("t", changes=CHANGES, tick_first=False,
                                retry=Retry(initial=0.01))
    with pytest.raises(PermanentBackendError, match="^connection refused$"):
        list(feed.changes())
    assert feed.connects == 1
    assert not feed.connected_once


def test_a_feed_that_streamed_is_connected_and_reconnects_after_a_transient_failure():
    feed = FirstConnectionFails("t", changes=CHANGES, tick_first=True, retry=Retry(initial=0.01))
    assert [c.position for c in feed.changes()] == [1, 2, 3]
    assert feed.connects == 2
    assert feed.stats.reconnects == 1


def test_stopping_and_the_acknowledged_position_are_public():
    feed = MemoryFeed("t", changes=CHANGES)
    assert not feed.stopping and feed.acknowledged is None
    for change in feed.changes():
        feed.ack(change.position)
        feed.stop()
        assert feed.stopping
    assert feed.acknowledged == 1


def test_the_acknowledged_position_moves_only_through_ack():
    feed = MemoryFeed("t", changes=CHANGES)
    with pytest.raises(AttributeError):
        feed.acknowledged = 3
    feed.ack(2)
    assert feed.acknowledged == 2 == feed.checkpoint.load("t")


def test_snapshot_changes_read_one_row_ahead_and_mark_the_last():
    feed = MemoryFeed("t")
    made = list(feed.snapshot_changes(iter("abc"), lambda row, number, last: (row, number, last)))
    assert made == [("a", 1, False), ("b", 2, False), ("c", 3, True)]
    assert list(feed.snapshot_changes([], lambda *args: args)) == []


def test_permanent_errors_end_the_feed():
    feed = FlakyFeed("t", changes=CHANGES, fail_times=1, error=ValueError)
    with pytest.raises(PermanentBackendError, match="ValueError"):
        list(feed.changes())


def test_retry_attempts_bound_consecutive_failures():
    feed = FlakyFeed(
        "t", changes=CHANGES, fail_times=10, fail_at=0, retry=Retry(initial=0.01, attempts=2)
    )
    with pytest.raises(PermanentBackendError, match="gave up after 2"):
        list(feed.changes())


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    retry = Retry(initial=1, maximum=8)
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (10, 8)]:
        delays = [retry.delay(failures) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


def test_bigchaindb_style_pipeline_receives_the_feed():
    sink = ListSink()
    feed = MemoryFeed("t", ChangeFeed.INSERT | ChangeFeed.DELETE, changes=CHANGES)
    sink_node = Node(sink)
    pipeline = Pipeline([sink_node])
    pipeline.setup(indata=feed)
    feed.run_forever()  # in this process, so the test can read the queue
    sink_node.run()
    sink_node.run()
    assert [c.operation for c in sink.items] == [Operation.INSERT, Operation.DELETE]


def test_bigchaindb_style_pipeline_runs_the_feed_in_its_own_process():
    import multiprocessing as mp

    results = mp.Queue()
    feed = MemoryFeed("t", ChangeFeed.INSERT | ChangeFeed.UPDATE, changes=CHANGES)
    pipeline = Pipeline([Node(lambda change: change.operation.name), results])
    pipeline.setup(indata=feed)
    pipeline.start()
    try:
        got = [results.get(timeout=10), results.get(timeout=10)]
    finally:
        pipeline.terminate()
    assert got == ["INSERT", "UPDATE"]


def test_run_forever_acknowledges_nothing_the_next_node_did_not_take():
    queue = Pipe()
    feed = MemoryFeed("t", changes=CHANGES)
    feed.outqueue = queue
    feed.run_forever()  # in this process: the feed ends, nobody has taken anything
    assert feed.checkpoint.load("t") is None
    assert [queue.get(timeout=5).position for _ in CHANGES] == [1, 2, 3]


def checkpoint_reaches(path, position) -> bool:
    """Whether the feed's process saved ``position`` (it fails the test after ten seconds)."""
    return wait_until(lambda: FileCheckpoint(path).load("t") == position,
                      f"the checkpoint to reach {position}", 10)


def test_run_forever_acknowledges_what_the_next_node_took_off_the_queue(tmp_path):
    import multiprocessing as mp

    path = tmp_path / "checkpoint.json"
    feed = MemoryFeed("t", changes=[insert("t", {"id": n}) for n in range(1, 6)], endless=True,
                      checkpoint=FileCheckpoint(path))
    taken, gate = mp.Queue(), mp.Event()

    def hold(change):
        taken.put(change.position)
        if change.position == 2:
            gate.wait(30)  # the node holds the second change; 3..5 wait on the queue

    pipeline = Pipeline([Node(hold)])
    pipeline.setup(indata=feed)
    pipeline.start()  # the feed and the node in processes of their own
    try:
        assert [taken.get(timeout=10) for _ in range(2)] == [1, 2]
        assert checkpoint_reaches(path, 2)
        time.sleep(1.0)  # the feed ticks five times meanwhile: 3..5 stay unacknowledged
        assert FileCheckpoint(path).load("t") == 2
        gate.set()
        assert [taken.get(timeout=10) for _ in range(3)] == [3, 4, 5]
        assert checkpoint_reaches(path, 5)
    finally:
        pipeline.terminate()


@pytest.mark.parametrize(
    "url, message",
    [("redis://localhost", r"unsupported URL \(redis://\)"), ("localhost:5432", "no scheme")],
)
def test_get_changefeed_rejects_unknown_urls(url, message):
    with pytest.raises(ConfigurationError, match=message):
        get_changefeed(url, "t", ChangeFeed.INSERT)


def test_get_changefeed_rejects_unknown_connection_types():
    with pytest.raises(ConfigurationError, match="no changefeed backend for a builtins.int"):
        get_changefeed(42, "t", ChangeFeed.INSERT)
