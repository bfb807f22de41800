"""`RedisStreamFeed` against a real redis-server: consumer-group workers sharing a stream, a
dead worker's entries claimed by another, runs that stop and go on, entries it cannot read."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import uuid

import pytest
import redis
from waiting import wait_until

from changefeed.backends.redis_streams import RedisStreamFeed
from changefeed.errors import DecodeError
from changefeed.pipelines import JsonLinesSink, Pipeline
from changefeed.pipelines.sinks.redis import RedisStreamSink
from changefeed.testing import ListSink, MemoryFeed, insert

pytestmark = pytest.mark.redis


def produce(redis_url: str, stream: str, n: int) -> MemoryFeed:
    feed = MemoryFeed("public.tasks", changes=[insert("public.tasks", {"id": i}, key={"id": i})
                                               for i in range(1, n + 1)])
    Pipeline(feed, sink=RedisStreamSink(redis_url, stream), batch_size=50, batch_seconds=60).run()
    return feed


def ids(path) -> list[int]:
    return [json.loads(line)["new"]["id"] for line in path.read_text().splitlines()]


def test_two_workers_share_one_stream(redis_url):
    stream = f"s-{uuid.uuid4().hex}"
    produce(redis_url, stream, 100)
    a = RedisStreamFeed(redis_url, stream, "workers", "a", count=10)
    b = RedisStreamFeed(redis_url, stream, "workers", "b", count=10)
    got_a, got_b = ListSink(), ListSink()
    # Interleave the two readers: each takes what the other has not.
    for _ in range(5):
        Pipeline(a, [], sink=got_a).run(limit=10)
        Pipeline(b, [], sink=got_b).run(limit=10)
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
    Pipeline(feed, sink=HangingSink(path), batch_size=10, batch_seconds=60).run()


def test_a_dead_workers_pending_entries_are_claimed_by_another(redis_url, tmp_path):
    stream = f"s-{uuid.uuid4().hex}"
    produce(redis_url, stream, 200)
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    worker = multiprocessing.get_context("fork").Process(
        target=run_worker, args=(redis_url, stream, out_a)
    )
    worker.start()
    wait_until(lambda: out_a.exists() and len(ids(out_a)) >= 20,  # written, then stuck
               "the worker's first rows", 10,                    # before XACK
               ended=lambda: not worker.is_alive())
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    client = redis.Redis.from_url(redis_url)
    left_by_a = client.xpending_range(stream, "workers", "-", "+", 100, consumername="a")
    stream_ids = {entry_id.decode(): json.loads(fields[b"change"])["new"]["id"]
                  for entry_id, fields in client.xrange(stream)}
    pending = sorted(stream_ids[e["message_id"].decode()] for e in left_by_a)
    # Its first batch was acknowledged; its second (written, never confirmed) was not, nor what
    # it read ahead meanwhile: at most one more batch (an explicit batch_size is a hard limit).
    assert pending in (list(range(11, 21)), list(range(11, 31)))

    # b gets every entry a did not acknowledge (11..200): those a left pending, once they
    # were idle for 0.5 s, and the ones nobody read. It runs until it has them all (a count,
    # not an idle time: a loaded machine may pause it longer than any idle timeout before it
    # claims again); the timeout only ends a run that never claims.
    b = RedisStreamFeed(redis_url, stream, "workers", "b", count=10, claim_idle=0.5)
    Pipeline(b, sink=JsonLinesSink(out_b), batch_size=10, batch_seconds=60).run(
        limit=190, timeout=60)

    assert b.claimed == len(left_by_a)
    claimed_ids = {e["message_id"].decode() for e in left_by_a}
    assert {stream_ids[i] for i in claimed_ids} <= set(ids(out_b))
    assert set(ids(out_a)) | set(ids(out_b)) == set(range(1, 201))  # nothing missing
    assert sorted(ids(out_b)) == list(range(11, 201))  # what a did not acknowledge, once
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
        Pipeline(feed, [], sink=sink).run(limit=stop_after, idle_timeout=1, timeout=30)
        runs.append([change.key["id"] for change in sink.items])
    assert runs == [[1, 2, 3], [4, 5, 6], [7], [8, 9, 10]]
    assert redis.Redis.from_url(redis_url).xpending(stream, "g")["pending"] == 0


@pytest.mark.parametrize("value", [b"not json", b'{"type": "insert", "model": "T", "data": {}}',
                                   b'{"operation": "insert"}'])
def test_the_entries_before_one_the_feed_cannot_read_are_delivered_and_acknowledged(
    redis_url, value
):
    """An entry that holds no change is the source's failure (`DecodeError`, exit 3), not the
    sink's: the output delivers what came before it, that is XACKed, and the next run stops at
    the same entry again, neither repeating the ones before nor skipping it."""
    stream = f"s-{uuid.uuid4().hex}"
    produce(redis_url, stream, 3)
    client = redis.Redis.from_url(redis_url)
    bad = client.xadd(stream, {"change": value, "position": b"4"}).decode()
    produce(redis_url, stream, 1)
    runs = []
    for _ in range(2):
        feed, sink = RedisStreamFeed(redis_url, stream, "g", "c1"), ListSink()
        problem = f"{stream} entry {bad} is not a change record"
        with pytest.raises(DecodeError, match=problem) as failure:
            Pipeline(feed, [], sink=sink).run(timeout=30)
        assert failure.value.exit_code == 3 and "\n" not in str(failure.value)
        runs.append([change.key["id"] for change in sink.items])
    assert runs == [[1, 2, 3], []]
    # Acknowledged: the three before it; pending: it and what was read after it.
    pending = client.xpending_range(stream, "g", "-", "+", 10)
    assert [entry["message_id"].decode() for entry in pending][0] == bad
    assert len(pending) == 2
