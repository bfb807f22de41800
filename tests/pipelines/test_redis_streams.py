"""The Redis stream sink against a real redis-server: what it adds, and a change read back from
the stream (the workers reading it: tests/backends/test_redis_stream_feed.py)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import redis

from changefeed import UNCHANGED, Operation
from changefeed.backends.redis_streams import RedisStreamFeed
from changefeed.pipelines import Pipeline, to_delta
from changefeed.pipelines.sinks.redis import RedisStreamSink
from changefeed.testing import ListSink, MemoryFeed, insert, update

pytestmark = pytest.mark.redis


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
