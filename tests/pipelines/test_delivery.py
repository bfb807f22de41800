"""A slow, hanging or retrying sink: the feed stays answered, batches grow, a stop is quick.

The sinks here are real (a webhook against a real HTTP server, Redis streams against a real
redis-server); the feed is the in-memory one, extended to record what the pipeline asks of it.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from testservers import (
    Receiver,
    refused_port,
    reserve_port,
    start_redis,
    stop_process,
    wait_for_port,
)
from waiting import wait_until

from changefeed import PipelineError, Retry
from changefeed.delivery import STOP_GRACE
from changefeed.pipelines import CallbackSink, JsonLinesSink, Pipeline, _sink_thread
from changefeed.pipelines.sinks import Sink
from changefeed.pipelines.sinks.http import WebhookSink
from changefeed.pipelines.sinks.redis import RedisStreamSink
from changefeed.testing import MemoryFeed, insert

STOP_BOUND = STOP_GRACE + 10.0
"""A stop must end a run within this many seconds (a retrying sink would take minutes)."""


class RecordingFeed(MemoryFeed):
    """A memory feed that records its acknowledgements and the keep_alive() calls."""

    def __init__(self, n: int = 0, **options) -> None:
        super().__init__("tasks", changes=[insert("tasks", {"id": i}) for i in range(1, n + 1)],
                         **options)
        self.acks: list[int] = []
        self.keep_alive_calls = 0
        self.kept_alive = threading.Event()

    def ack(self, position) -> None:
        self.acks.append(position)
        super().ack(position)

    def keep_alive(self) -> None:
        self.keep_alive_calls += 1
        if self.keep_alive_calls >= 3:
            self.kept_alive.set()


def run_in_thread(pipeline: Pipeline, **options) -> tuple[threading.Thread, list]:
    """Start ``pipeline.run(**options)`` in a thread; the list gets its result or error."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(pipeline.run(**options))
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def stop_and_join(pipeline: Pipeline, thread: threading.Thread) -> float:
    """Stop ``pipeline``; fail unless its run ends within `STOP_BOUND`; the seconds it took."""
    started = time.monotonic()
    pipeline.stop()
    thread.join(STOP_BOUND)
    assert not thread.is_alive(), f"the run did not end within {STOP_BOUND} s of the stop"
    return time.monotonic() - started


def test_the_feed_is_kept_alive_while_the_sink_is_busy():
    feed = RecordingFeed(3)
    delivered = []

    def slow_sink(batch_):
        # Returns only once the pipeline called keep_alive() a few times meanwhile.
        assert feed.kept_alive.wait(30), "keep_alive() was not called while the sink was busy"
        delivered.extend(c.new["id"] for c in batch_)

    Pipeline(feed, sink=slow_sink, batch_size=10, batch_seconds=60).run()
    assert delivered == [1, 2, 3] and feed.acks == [3]


def test_while_the_sink_is_busy_the_next_batch_grows_up_to_ten_times_its_size():
    feed = RecordingFeed(12_500)
    batches: list[list[int]] = []

    def sink(batch_):
        if not batches:  # busy until the feed's thread had to wait: its next batch is full
            assert feed.kept_alive.wait(30)
        batches.append([c.new["id"] for c in batch_.items])

    # The default policy (1000 items): a batch grows while the sink is busy, up to 10 000.
    Pipeline(feed, [], sink=CallbackSink(sink, batches=True)).run()
    sizes = [len(b) for b in batches]
    assert sizes[0] <= 1000 and sizes[1] == 10_000, sizes
    assert [i for b in batches for i in b] == list(range(1, 12_501))
    # Acknowledged in order, each time the end of a confirmed batch.
    assert feed.acks == [b[-1] for b in batches]


def test_an_explicit_batch_size_stays_a_hard_limit_when_the_sink_is_slow():
    feed = RecordingFeed(450)
    sizes: list[int] = []

    def sink(items):
        if not sizes:
            assert feed.kept_alive.wait(30)
        sizes.append(len(items))

    Pipeline(feed, sink=sink, batch_size=100, batch_seconds=60).run()
    assert sum(sizes) == 450 and max(sizes) == 100


def test_a_stop_ends_the_run_while_the_webhook_retries_and_keeps_what_was_confirmed():
    receiver = Receiver().start()
    try:
        feed = RecordingFeed(endless=True)
        sink = WebhookSink(receiver.url)  # default retries: minutes of backoff
        pipeline = Pipeline(feed, sink=sink, batch_size=3, batch_seconds=0.1)
        for i in range(1, 4):
            feed.push(insert("tasks", {"id": i}))
        thread, outcome = run_in_thread(pipeline)
        wait_until(lambda: len(receiver.accepted()) == 1, "the first batch")
        receiver.fail_first = 10**9  # from now on: 503 forever
        for i in range(4, 7):
            feed.push(insert("tasks", {"id": i}))
        wait_until(lambda: len(receiver.requests) >= 3, "two failed attempts")
        stop_and_join(pipeline, thread)
    finally:
        receiver.stop()
    assert outcome == [3]  # handled: the confirmed batch only
    assert feed.checkpoint.load("tasks") == 3  # 4..6 were not confirmed: they come again


def test_a_stop_ends_the_run_while_the_webhook_hangs():
    receiver = Receiver(delay=3600).start()  # accepts, never answers
    try:
        feed = RecordingFeed(2)
        pipeline = Pipeline(feed, [], sink=WebhookSink(receiver.url, timeout=600))
        thread, _ = run_in_thread(pipeline, timeout=600)
        wait_until(lambda: feed.keep_alive_calls > 0, "the feed's thread waiting")
        stop_and_join(pipeline, thread)
    finally:
        receiver.stop()
    assert feed.checkpoint.load("tasks") is None


def test_processes_a_stop_ends_the_run_while_the_webhook_retries():
    receiver = Receiver(fail_first=10**9).start()
    try:
        feed = RecordingFeed(3)
        pipeline = Pipeline(feed, [], sink=WebhookSink(receiver.url), processes=True)
        thread, _ = run_in_thread(pipeline, timeout=600)
        wait_until(lambda: len(receiver.requests) >= 2, "two failed attempts")
        assert feed.keep_alive_calls > 0  # the feed's process answered while it waited
        stop_and_join(pipeline, thread)
    finally:
        receiver.stop()
    assert feed.checkpoint.load("tasks") is None


@pytest.mark.parametrize("processes", [False, True], ids=["sink thread", "sink process"])
@pytest.mark.parametrize("answers_in_the_grace", [True, False], ids=["answers", "hangs"])
def test_a_stop_gives_the_sink_the_same_grace_in_a_thread_and_in_a_process(
    processes, answers_in_the_grace
):
    receiver = Receiver(delay=3600).start()  # answers once released
    try:
        feed = RecordingFeed(endless=True)
        for i in range(1, 4):
            feed.push(insert("tasks", {"id": i}))
        sink = WebhookSink(receiver.url, timeout=600)
        pipeline = Pipeline(feed, [], sink=sink, processes=processes)
        thread, _ = run_in_thread(pipeline)
        wait_until(lambda: feed.keep_alive_calls > 0, "the feed's side waiting on the sink")
        if answers_in_the_grace:
            threading.Timer(1.0, receiver.release.set).start()  # after the stop, in the grace
        seconds = stop_and_join(pipeline, thread)
    finally:
        receiver.stop()
    if answers_in_the_grace:
        assert feed.checkpoint.load("tasks") == 3 and seconds < STOP_GRACE
    else:
        assert feed.checkpoint.load("tasks") is None and seconds >= STOP_GRACE


# -- Redis sink: connection errors are retried -----------------------------------------------


def test_redis_sink_retries_until_redis_starts(tmp_path, caplog):
    reserved = reserve_port()  # refused until redis starts on it; no one else can take it
    port = reserved.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    feed = RecordingFeed(5)
    sink = RedisStreamSink(url, "late", retry=Retry(initial=0.1, maximum=0.5, attempts=100))
    thread, outcome = run_in_thread(Pipeline(feed, [], sink=sink))
    # Nothing listens yet: the sink retries (and says so) until the server comes.
    wait_until(lambda: "retrying in" in caplog.text, "a retry warning")
    reserved.close()  # redis binds it itself
    process = start_redis(port, str(tmp_path))
    try:
        wait_for_port(port, process, "redis-server")
        thread.join(60)
        assert outcome == [5]
        entries = redis.Redis.from_url(url).xrange("late")
        assert [json.loads(fields[b"change"])["new"]["id"] for _, fields in entries] == [
            1, 2, 3, 4, 5
        ]
        assert feed.checkpoint.load("tasks") == 5
    finally:
        stop_process(process)
    assert "ConnectionError" in caplog.text


def test_redis_sink_gives_up_after_its_attempts_with_one_clear_error():
    url = f"redis://:hunter2@127.0.0.1:{refused_port()}/0"
    feed = RecordingFeed(2)
    sink = RedisStreamSink(url, "never", retry=Retry(initial=0.01, maximum=0.02, attempts=2))
    with pytest.raises(PipelineError, match=r"failed 3 times; last: ConnectionError") as info:
        Pipeline(feed, [], sink=sink).run()
    assert "hunter2" not in str(info.value) and "127.0.0.1" in str(info.value)
    assert feed.checkpoint.load("tasks") is None


def test_a_stop_ends_the_run_while_the_redis_sink_retries():
    feed = RecordingFeed(2)
    sink = RedisStreamSink(f"redis://127.0.0.1:{refused_port()}/0", "never")
    pipeline = Pipeline(feed, [], sink=sink)
    thread, _ = run_in_thread(pipeline, timeout=600)
    wait_until(lambda: feed.keep_alive_calls > 0, "the feed's thread waiting")
    stop_and_join(pipeline, thread)
    assert feed.checkpoint.load("tasks") is None


# -- local sinks are called inline ------------------------------------------------------------


def test_a_file_sink_is_called_in_the_feeds_thread_other_sinks_in_the_sink_thread(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert JsonLinesSink(tmp_path / "new.jsonl").local and JsonLinesSink(os.devnull).local
    assert not JsonLinesSink("-").local and not JsonLinesSink(fifo).local

    # Sink threads another test abandoned (after a stop) may still be ending: not ours.
    earlier = {t for t in threading.enumerate() if t.name == "changefeed-sink"}

    def sink_threads(change):
        seen.append(any(t.name == "changefeed-sink" and t not in earlier
                        for t in threading.enumerate()))
        return change

    seen: list[bool] = []
    out = tmp_path / "out.jsonl"
    Pipeline(RecordingFeed(2), [sink_threads], sink=JsonLinesSink(out)).run()
    assert seen == [False, False] and len(out.read_text().splitlines()) == 2
    seen.clear()
    Pipeline(RecordingFeed(2), [sink_threads], sink=lambda change: None).run()
    assert seen == [True, True]
    seen.clear()  # a dead-letter sink that may wait makes the whole step threaded
    Pipeline(RecordingFeed(2), [sink_threads], sink=JsonLinesSink(out),
             dead_letter=lambda record: None).run()
    assert seen == [True, True]


def test_a_webhook_sink_works_again_in_a_new_run_after_a_failed_one():
    receiver = Receiver(fail_first=1, fail_status=400).start()
    try:
        sink = WebhookSink(receiver.url)
        with pytest.raises(PipelineError, match="answered 400"):
            Pipeline(RecordingFeed(1), [], sink=sink).run()
        feed = RecordingFeed(2)
        assert Pipeline(feed, [], sink=sink).run() == 2  # not left interrupted
    finally:
        receiver.stop()
    assert len(receiver.accepted()) == 1 and feed.checkpoint.load("tasks") == 2


class FailingSlowToClose(Sink):
    """A sink whose batch fails and whose close takes a moment (a client shutting down)."""

    name = "failing"

    def __init__(self) -> None:
        self.events: list[str] = []

    def write_batch(self, batch) -> None:
        raise OSError("the server went away")

    def interrupt(self) -> None:
        self.events.append("interrupt")

    def close(self) -> None:
        time.sleep(0.2)
        self.events.append("close")


def test_a_failed_run_ends_only_once_its_sink_thread_closed_the_sinks(monkeypatch):
    # Else the thread closes them (or is told to stop them) late, under the next run that
    # uses the same sinks (a CI failure: the webhook test above, its next run interrupted).
    # private: the sink thread is descheduled right after it hands its failure over, as a
    # loaded machine may do; the run must still end only after the thread closed the sinks.
    init = _sink_thread._SinkThread.__init__

    class Descheduled:
        def __init__(self, results) -> None:
            self.results = results

        def put(self, item) -> None:
            self.results.put(item)
            if isinstance(item, BaseException):
                time.sleep(0.3)

        def __getattr__(self, name):
            return getattr(self.results, name)

    def late_thread(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self._results = Descheduled(self._results)

    monkeypatch.setattr(_sink_thread._SinkThread, "__init__", late_thread)
    sink = FailingSlowToClose()
    with pytest.raises(PipelineError, match="went away"):
        Pipeline(RecordingFeed(1), [], sink=sink).run()
    assert sink.events == ["close"]  # closed before run() ended, and never told to stop
    sink.events.clear()
    with pytest.raises(PipelineError, match="went away"):
        Pipeline(RecordingFeed(1), [], sink=sink).run()
    assert sink.events == ["close"]


def test_the_network_sinks_pickle_for_spawned_processes():
    import pickle

    for sink in (WebhookSink("https://tok@h/x?k=1"), RedisStreamSink("redis://h/0", "s")):
        sink.interrupt()
        copy = pickle.loads(pickle.dumps(sink))
        # private: an interrupt is a process-local event and must not travel with the copy
        assert copy.url == sink.url and not copy._interrupted.is_set()
        assert "tok" not in repr(copy) and "k=1" not in repr(copy)
