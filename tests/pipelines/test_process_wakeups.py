"""An idle feed with busy workers (``--processes``) waits on the workers' confirmations and the
replication socket at once (`ChangeFeed.wait_for_source`): it reads on when the source sends
first, and sends what it holds the moment the workers are free. On a real server: the wait ends
on whichever comes first, and a live stream that arrives while a slow sink works is delivered
whole, in order, once, and acknowledged exactly (a next run gets nothing again).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from clitools import CHANGEFEED, json_lines, run_cli, start_cli
from feeds import FAST_RETRY, make_feed, start
from waiting import wait_until

from changefeed import get_changefeed, testing
from changefeed.pipelines import JsonLinesSink, Pipeline, to_delta
from changefeed.pipelines._steps import _Confirmed
from changefeed.pipelines.sinks import Batch

pytestmark = pytest.mark.postgres


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    return pg


def test_the_wait_ends_on_the_workers_pipe_or_the_source_whichever_comes_first(pg_dsn, tasks):
    feed = make_feed(pg_dsn, "tasks")
    start(feed)
    workers, confirm = os.pipe()  # the workers' confirmations: read end, write end
    ticks = feed.changes(ticks=True, timeout=60)
    try:
        assert next(ticks) is None  # caught up: nothing at hand

        def quiet() -> None:  # read what the server sent since (keepalives), until nothing
            for _ in range(20):
                if not feed.wait_for_source(0.0, workers):
                    return
                assert next(ticks) is None
            pytest.fail("the wait kept saying the source has more, and nothing came")

        def says_nothing_from_the_source(timeout: float | None) -> bool:
            """Whether ``wait_for_source(timeout, workers)`` says False: the server may send a
            keepalive of its own at any instant (PostgreSQL 15+ does for nearly any transaction
            on the server), so one that lands in the wait is read (no change comes of it) and
            the wait asked again; a few times at most, so a wait that says True for nothing
            still fails."""
            for _ in range(3):
                if feed.wait_for_source(timeout, workers) is False:
                    return True
                assert next(ticks) is None
            return False

        quiet()
        # The workers answer first: the wait ends on their pipe, not at the server's next
        # keepalive (tens of seconds away), and says the source has nothing.
        os.write(confirm, b"c")
        assert says_nothing_from_the_source(None)
        assert os.read(workers, 1) == b"c"
        assert says_nothing_from_the_source(0.0)  # neither, in the time given
        # The source sends first: the wait says so, and the change is read next.
        tasks.execute("INSERT INTO tasks VALUES (1, 'one')")
        assert feed.wait_for_source(None, workers) is True
        change = next(item for item in ticks if item is not None)
        assert change.key == {"id": 1}
        feed.ack(change.position)
        quiet()
        # Both at once: the source's news is what counts (read on), the pipe stays readable.
        tasks.execute("INSERT INTO tasks VALUES (2, 'two')")
        silent, unused = os.pipe()
        try:
            assert feed.wait_for_source(None, silent) is True  # the server sent it
        finally:
            os.close(silent)
            os.close(unused)
        os.write(confirm, b"c")
        assert feed.wait_for_source(None, workers) is True
        assert next(item for item in ticks if item is not None).key == {"id": 2}
    finally:
        ticks.close()
        os.close(workers)
        os.close(confirm)


class SlowSink(JsonLinesSink):
    """A file sink that takes its time over each batch (a remote sink would), so that the
    feed meets busy workers at its idle moments."""

    def write_batch(self, batch: Batch) -> None:
        time.sleep(0.02)
        super().write_batch(batch)


@contextlib.contextmanager
def live_writes(dsn: str, transactions: int, rows: int) -> Iterator[None]:
    """While the body runs, ``transactions`` commits of ``rows`` inserts each into ``tasks``
    from a thread, spread out as a live stream (ids 1 on)."""

    def write() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for number in range(transactions):
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO tasks SELECT g, 'task ' || g FROM generate_series(%s::int,"
                        " %s::int) g", [number * rows + 1, (number + 1) * rows])
                time.sleep(0.005)  # the pace of the writes, not a wait for anything

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield
    finally:
        writer.join()


@pytest.mark.parametrize("batching", [{}, {"batch_size": 7}], ids=["default", "batch_size=7"])
def test_a_live_stream_through_busy_workers_is_delivered_whole_in_order_once(
    pg_dsn, tasks, tmp_path, batching
):
    slot = f"wake_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out.jsonl"

    def pipeline() -> Pipeline:
        feed = get_changefeed(pg_dsn, "tasks", slot=slot, retry=FAST_RETRY)
        return Pipeline(feed, [to_delta()], sink=SlowSink(out), processes=True, **batching)

    pipeline().run(idle_timeout=0.3, timeout=20)  # the slot exists: every commit is streamed
    transactions, rows = 40, 13
    with live_writes(pg_dsn, transactions, rows):
        handled = pipeline().run(limit=transactions * rows, timeout=60)
    assert handled == transactions * rows
    delivered = [json.loads(line)["data"]["id"] for line in out.read_text().splitlines()]
    assert delivered == list(range(1, transactions * rows + 1))
    # Acknowledged exactly: a next run finds nothing to deliver again.
    assert pipeline().run(idle_timeout=0.5, timeout=20) == 0


def test_the_feed_s_own_lines_cross_to_busy_workers_whole_in_order_once(pg_dsn, tasks, tmp_path):
    # ``--where`` with a file sink and ``--processes``: batches of the feed's lines cross.
    slot = f"wake_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out.jsonl"
    argv = [*CHANGEFEED, "run", "tasks", "--url", pg_dsn, "--slot", slot, "--where", "id > 0",
            "--sink", str(out), "--processes", "--quiet"]
    subprocess.run([*argv, "--idle-timeout", "0.3"], check=True, timeout=60)
    transactions, rows = 60, 29
    with live_writes(pg_dsn, transactions, rows):
        subprocess.run([*argv, "--limit", str(transactions * rows)], check=True, timeout=60)
    ids = [line["data"]["id"] for line in json_lines(out.read_text())]
    assert ids == list(range(1, transactions * rows + 1))
    subprocess.run([*argv, "--idle-timeout", "0.5"], check=True, timeout=60)
    assert len(out.read_text().splitlines()) == transactions * rows  # nothing came again


class Sent(list):
    """Stands in for the queue to the workers: what the feed's process sends, in order."""

    def put(self, chunk) -> None:
        self.append((len(chunk), chunk.flush))


def test_a_chunk_that_waited_its_batch_s_time_goes_to_be_delivered_at_once():
    # A chunk held while the workers were busy can reach its batch's age before it is full:
    # it goes with ``flush`` (the sink's process delivers it at once, instead of starting the
    # batch's wait anew); a full chunk goes without (the sink's process batches it as due).
    feed = testing.MemoryFeed("tasks", changes=[])
    pipeline = Pipeline(feed, sink=testing.ListSink(), processes=True, batch_size=3,
                        batch_seconds=5.0)
    output = pipeline.output()
    output.confirm = lambda position, count: None
    sent = output.inqueue = Sent()  # no workers: only what is sent is looked at
    output.nodes = []
    output.confirmations_ready = lambda seconds: False  # nothing comes back
    for number in range(1, 4):
        output.put(testing.insert("tasks", {"id": number}))
    output.put(testing.insert("tasks", {"id": 4}))
    output.chunk_started -= 5.0  # as if it had been held for its batch's time
    output.put(testing.insert("tasks", {"id": 5}))
    assert sent == [(3, False), (2, True)]


@pytest.mark.parametrize("stage", [["--where", "id > 0"], ["--stage", "slow_stage:slow"]],
                         ids=["feed-lines", "slow-stage"])
def test_a_back_fill_through_busy_workers_reads_every_chunk(pg_dsn, tasks, tmp_path, stage):
    # A back-fill's next chunk is the feed's own work, not the socket's: an idle feed whose
    # workers are busy reads it at once (`wait_for_source` says the source has more).
    tasks.execute("INSERT INTO tasks SELECT g, 'task ' || g FROM generate_series(1, 1200) g")
    slot = f"wake_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out.jsonl"
    (tmp_path / "slow_stage.py").write_text(
        "import time\n\ndef slow(change):\n    time.sleep(0.001)\n    return change\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    start(make_feed(pg_dsn, "tasks", slot=slot))
    with start_cli("run", "tasks", "--slot", slot, "--url", pg_dsn, "--format", "change",
                   "--chunk-size", "100", *stage, "--sink", str(out), "--processes",
                   env=env) as process:
        process.wait_streaming()
        requested = run_cli("backfill", "tasks", "--slot", slot, "--url", pg_dsn)
        assert requested.returncode == 0, requested.stderr
        process.wait_for_stderr("snapshot of public.tasks: done, 1,200 rows", timeout=60)
        tasks.execute("INSERT INTO tasks VALUES (1201, 'after')")
        wait_until(lambda: out.exists() and b'"id":1201' in out.read_bytes().replace(b" ", b""),
                   "the change after the back-fill in the sink's file", timeout=60)
        process.stop()
    items = json_lines(out.read_text())
    assert [item["key"]["id"] for item in items if item.get("snapshot")] == list(range(1, 1201))
    assert items[-1]["key"] == {"id": 1201}


class SourceWithMore:
    """A feed whose source always has more at hand (what `wait_for_source` says)."""

    stopping = False

    def wait_for_source(self, timeout, fd) -> bool:
        return True

    def keep_alive(self) -> None:
        pass


class Confirmations:
    """Stands in for the queue of confirmations: what the test lets the workers confirm."""

    def __init__(self) -> None:
        self.waiting: list[_Confirmed] = []

    def ready(self, seconds: float) -> bool:
        return bool(self.waiting)

    def get_nowait(self) -> _Confirmed:
        return self.waiting.pop(0)


def test_an_idle_feed_queues_one_chunk_behind_busy_workers_then_reads_on():
    # Idle with nothing in flight, or one chunk (a worker on it): the chunk goes at once, to
    # wait in the queue (a worker that is done never waits for the feed's next send). Idle
    # with two in flight while the source has more: the feed holds it and reads on, until one
    # of them is confirmed.
    feed = testing.MemoryFeed("tasks", changes=[])
    output = Pipeline(feed, sink=testing.ListSink(), processes=True).output()
    output.feed = SourceWithMore()
    output.confirm = lambda position, count: None
    sent = output.inqueue = Sent()
    confirmations = output.outqueue = Confirmations()
    output.confirmations_ready = confirmations.ready
    output.confirmations, output.nodes = -1, []
    for number in (1, 2, 3, 4):
        output.put(testing.insert("tasks", {"id": number}))
        output.idle()
    assert sent == [(1, True), (1, True)]  # the third and fourth are held, in one chunk
    confirmations.waiting.append(_Confirmed(None, 1))  # the first chunk is delivered
    output.idle()
    assert sent == [(1, True), (1, True), (2, True)]
    assert not output.chunk
