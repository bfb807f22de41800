"""Redis Streams against a real redis-server: sink -> stream -> consumer-group workers."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import signal
import time
import uuid

import pytest
import redis

from changefeed import UNCHANGED, Operation
from changefeed.backends.redis_streams import RedisStreamFeed
from changefeed.pipelines import JsonLinesSink, Pipeline, batch, to_delta
from changefeed.pipelines.sinks.redis import RedisStreamSink
from changefeed.testing import ListSink, MemoryFeed, insert, update

pytestmark = pytest.mark.redis


def produce(redis_url: str, stream: str, n: int) -> MemoryFeed:
    feed = MemoryFeed("public.tasks", changes=[insert("public.tasks", {"id": i}, key={"id": i})
                                               for i in range(1, n + 1)])
    Pipeline(feed, [batch(50, 60)], sink=RedisStreamSink(redis_url, stream)).run()
    return feed


def ids(path) -> list[int]:
    return [json.loads(line)["new"]["id"] for line in path.read_text().splitlines()]


def test_a_change_survives_the_round_trip_through_a_stream(redis_url):
    stream = f"s-{uuid.uuid4().hex}"
    committed = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    source = MemoryFeed("public.tasks", changes=[
        update("public.tasks", {"id": 1, "body": UNCHANGED, "done": True},
               {"id": 1, "body": "long", "done": False}, key={"id": 1},
               committed_at=committed, transaction=42),
    ])
    Pipeline(source, [], sink=RedisStreamSink(redis_url, stream)).run()
    assert source.checkpoint.positions == {"public.tasks": 1}  # acknowledged once in the stream

    feed = RedisStreamFeed(redis_url, stream, "g", "c1")
    sink = ListSink()
    Pipeline(feed, [], sink=sink).run(idle_timeout=0.5)
    [change] = sink.items
    assert change.operation is Operation.UPDATE
    assert change.new == {"id": 1, "body": UNCHANGED, "done": True}
    assert (change.old, change.key, change.committed_at, change.transaction) == (
        {"id": 1, "body": "long", "done": False}, {"id": 1}, committed, 42
    )
    assert change.meta == {"source_position": 1}
    assert redis.Redis.from_url(redis_url).xpending(stream, "g")["pending"] == 0  # XACKed


def test_the_stream_sink_refuses_deltas(redis_url):
    from changefeed import PipelineError

    feed = MemoryFeed("t", changes=[insert("t", {"id": 1})])
    with pytest.raises(PipelineError, match="stores changes"):
        Pipeline(feed, [to_delta()], sink=RedisStreamSink(redis_url, "x")).run()


def test_two_workers_share_one_stream(redis_url):
    stream = f"s-{uuid.uuid4().hex}"
    produce(redis_url, stream, 100)
    a = RedisStreamFeed(redis_url, stream, "workers", "a", count=10)
    b = RedisStreamFeed(redis_url, stream, "workers", "b", count=10)
    got_a, got_b = ListSink(), ListSink()
    # Interleave the two readers: each takes what the other has not.
    for _ in range(5):
        Pipeline(a, [], sink=got_a).run(stop_after=10)
        Pipeline(b, [], sink=got_b).run(stop_after=10)
    ids_a = {c.new["id"] for c in got_a}
    ids_b = {c.new["id"] for c in got_b}
    assert len(ids_a) == len(ids_b) == 50 and not ids_a & ids_b
    assert ids_a | ids_b == set(range(1, 101))


class HangingSink(JsonLinesSink):
    """Writes each batch, and never returns from its second one (so it is never XACKed)."""

    def __init__(self, path):
        super().__init__(path)
        self.batches = 0

    def write_batch(self, batch_):
        super().write_batch(batch_)
        self.batches += 1
        if self.batches == 2:
            time.sleep(3600)


def run_worker(redis_url, stream, path):
    feed = RedisStreamFeed(redis_url, stream, "workers", "a", count=10, claim_idle=0.5)
    Pipeline(feed, [batch(10, 60)], sink=HangingSink(path)).run()


def test_a_dead_workers_pending_entries_are_claimed_by_another(redis_url, tmp_path):
    stream = f"s-{uuid.uuid4().hex}"
    produce(redis_url, stream, 200)
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    worker = multiprocessing.get_context("fork").Process(
        target=run_worker, args=(redis_url, stream, out_a)
    )
    worker.start()
    deadline = time.monotonic() + 10
    while not (out_a.exists() and len(ids(out_a)) >= 20):  # written, then stuck before XACK
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    client = redis.Redis.from_url(redis_url)
    left_by_a = client.xpending_range(stream, "workers", "-", "+", 100, consumername="a")
    stream_ids = {entry_id.decode(): json.loads(fields[b"change"])["new"]["id"]
                  for entry_id, fields in client.xrange(stream)}
    pending = sorted(stream_ids[e["message_id"].decode()] for e in left_by_a)
    # Its first batch was acknowledged; its second (written, never confirmed) was not, nor what
    # it read ahead meanwhile: at most one more batch (explicit batch(10) is a hard limit).
    assert pending in (list(range(11, 21)), list(range(11, 31)))

    b = RedisStreamFeed(redis_url, stream, "workers", "b", count=10, claim_idle=0.5)
    Pipeline(b, [batch(10, 60)], sink=JsonLinesSink(out_b)).run(idle_timeout=1.5)

    assert b.claimed == len(left_by_a)
    claimed_ids = {e["message_id"].decode() for e in left_by_a}
    assert {stream_ids[i] for i in claimed_ids} <= set(ids(out_b))
    assert set(ids(out_a)) | set(ids(out_b)) == set(range(1, 201))  # nothing missing
    assert client.xpending(stream, "workers")["pending"] == 0


def test_runs_that_stop_after_a_few_changes_go_on_where_the_last_one_stopped(redis_url):
    # Each run reads ahead of what it delivers: what it delivered is XACKed as it ends, what it
    # only read stays pending for the consumer and comes first in the next run.
    stream = f"s-{uuid.uuid4().hex}"
    produce(redis_url, stream, 10)
    runs = []
    for stop_after in (3, 3, 1, None):
        feed = RedisStreamFeed(redis_url, stream, "g", "c1")
        sink = ListSink()
        Pipeline(feed, [], sink=sink).run(stop_after=stop_after, idle_timeout=1, timeout=30)
        runs.append([change.key["id"] for change in sink.items])
    assert runs == [[1, 2, 3], [4, 5, 6], [7], [8, 9, 10]]
    assert redis.Redis.from_url(redis_url).xpending(stream, "g")["pending"] == 0
