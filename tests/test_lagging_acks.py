"""Acknowledgements that lag behind what was handed out, on real servers.

A consumer (a sink working in batches, a slow worker) acknowledges some changes after it was
handed later ones: snapshot chunks after the next chunk was read, transactions after the next
transactions came, messages, Kafka records and Redis entries after later ones. Each test reads
with acknowledgements ``lag`` changes behind, stops (as a crash would: what was handed out and
not acknowledged is lost), and runs again: everything acknowledged must be skipped exactly, and
everything not acknowledged must come again. Two bugs planted on purpose in the back-fill
survived every earlier test (progress recorded before the chunk's rows were acknowledged; a
late acknowledgement of a chunk recording the next chunk's last key): these tests catch both.
"""

from __future__ import annotations

import collections
import uuid

import pytest
import redis
from kafkatools import FAST_GROUP, create_topic, new_table

from changefeed import FileCheckpoint, MemoryCheckpoint, Retry
from changefeed.backends.kafka import KafkaFeed
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.backends.redis_streams import RedisStreamFeed
from changefeed.pipelines import Pipeline, batch
from changefeed.pipelines.sinks.kafka import KafkaSink
from changefeed.pipelines.sinks.redis import RedisStreamSink
from changefeed.testing import MemoryFeed, insert


def read_lagging(feed, *, lag: int, stop_after: int, timeout: float = 60.0,
                 idle: float | None = 2.0):
    """Take ``stop_after`` items from ``feed`` (or all it has until idle), acknowledging each
    only once ``lag`` more were handed out; then close it, as a process that dies would leave
    it. Returns (handed out, acknowledged)."""
    handed: list = []
    waiting: collections.deque = collections.deque()
    acked: list = []
    for item in feed.changes(limit=stop_after, idle_timeout=idle, timeout=timeout):
        handed.append(item)
        waiting.append(item)
        if len(waiting) > lag:
            done = waiting.popleft()
            feed.ack(done.position)
            acked.append(done)
    feed.close()
    return handed, acked


def drain(feed, timeout: float = 60.0, idle: float = 0.5) -> list:
    """Everything ``feed`` has, each acknowledged: until idle, which for a PostgreSQL feed
    means caught up with the server's WAL (see `feeds.drain`), so a short ``idle`` will do."""
    got = []
    for item in feed.changes(idle_timeout=idle, timeout=timeout):
        got.append(item)
        feed.ack(item.position)
    feed.close()
    return got


def ids(items) -> list:
    return [item.key["id"] for item in items if getattr(item, "key", None)]


# -- PostgreSQL: snapshot chunks ---------------------------------------------------------------


def pg_feed(dsn, table, **options) -> PostgresChangeFeed:
    return PostgresChangeFeed(table, connection=dsn, retry=Retry(initial=0.05, maximum=0.5),
                              **options)


@pytest.mark.postgres
@pytest.mark.parametrize("key", ["primary key", "no key"])
@pytest.mark.parametrize("chunk, lag, stop_after", [
    (10, 15, 25),    # chunk 1 acknowledged only while chunk 2 is handed out, then a crash
    (10, 25, 40),    # two chunks behind
    (7, 7, 30),      # exactly one chunk behind
    (10, 1, 15),     # barely behind
    (10, 12, 20),    # stopped on a chunk's last row
])
def test_snapshot_chunks_acknowledged_late_resume_after_the_last_acknowledged_chunk(
    pg_dsn, pg, key, chunk, lag, stop_after
):
    pg.execute("CREATE TABLE t (id int NOT NULL, v text)")
    if key == "primary key":
        pg.execute("ALTER TABLE t ADD PRIMARY KEY (id)")
    else:
        pg.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g")
    handed, acked = read_lagging(
        pg_feed(pg_dsn, "t", prefeed="snapshot", chunk_size=chunk), lag=lag,
        stop_after=stop_after)
    assert ids(handed) == list(range(1, stop_after + 1))
    rest = drain(pg_feed(pg_dsn, "t", prefeed="snapshot", chunk_size=chunk))
    # The next run goes on after the last chunk wholly acknowledged: nothing not acknowledged
    # is skipped, no chunk acknowledged comes again.
    assert sorted(ids(rest)) == list(range(len(acked) // chunk * chunk + 1, 101))


@pytest.mark.postgres
def test_a_chunk_acknowledged_late_records_its_own_last_key_not_the_next_chunks(pg_dsn, pg):
    """Chunk 1's last row is acknowledged only after chunk 2 was handed out whole: the progress
    recorded then must be chunk 1's last key. The feed is closed before chunk 2 is; the next
    run must read chunk 2 again."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("INSERT INTO t SELECT generate_series(1, 30)")
    feed = pg_feed(pg_dsn, "t", prefeed="snapshot", chunk_size=10)
    handed = []
    for change in feed.changes(limit=20, timeout=60):
        handed.append(change)
    feed.ack(handed[9].position)  # chunk 1, late: chunk 2 was handed out already
    for _ in feed.changes(limit=1, timeout=1):  # one more turn of the stream: it records
        pass
    feed.close()
    record = pg.execute("SELECT obj_description(oid, 'pg_publication') FROM pg_publication"
                        ).fetchone()[0]
    assert '"after": ["10"]' in record, record
    rest = drain(pg_feed(pg_dsn, "t", prefeed="snapshot", chunk_size=10))
    assert ids(rest)[:10] == list(range(11, 21))


# -- PostgreSQL: transactions and messages -----------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("lag, stop_after", [(1, 13), (5, 30), (17, 40), (40, 55)])
def test_transactions_acknowledged_late_come_again_from_the_first_not_acknowledged(
    pg_dsn, pg, tmp_path, checkpoint, lag, stop_after
):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    drain(pg_feed(pg_dsn, "t"))  # the slot: writes from here on are streamed
    first = 1
    for size in (1, 7, 3, 12, 1, 20, 5, 9, 2, 10):  # 70 rows in transactions of many sizes
        with pg.transaction():
            pg.execute("INSERT INTO t SELECT generate_series(%s::int, %s::int)",
                       [first, first + size - 1])
        first += size

    def feed():
        store = FileCheckpoint(tmp_path / "checkpoint") if checkpoint else MemoryCheckpoint()
        return pg_feed(pg_dsn, "t", checkpoint=store)

    handed, acked = read_lagging(feed(), lag=lag, stop_after=stop_after)
    assert ids(handed) == list(range(1, stop_after + 1))
    rest = ids(drain(feed()))
    if checkpoint:  # exactly after the last acknowledged change
        assert rest == list(range(len(acked) + 1, 71))
    else:  # from the start of the transaction of the first change not acknowledged
        assert rest[-1] == 70 and rest == list(range(rest[0], 71))
        assert rest[0] <= len(acked) + 1


@pytest.mark.postgres
@pytest.mark.parametrize("lag", [1, 4, 9])
def test_messages_acknowledged_late_come_again(pg_dsn, pg, tmp_path, lag):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    feed_args = {"messages": ["app"], "checkpoint": FileCheckpoint(tmp_path / "checkpoint")}
    drain(pg_feed(pg_dsn, "t", **feed_args))
    written = []
    for number in range(12):  # transactional ones among rows, non-transactional between
        if number % 3 == 0:
            pg.execute("SELECT pg_logical_emit_message(false, 'app', %s)", [f"m{number}"])
        else:
            with pg.transaction():
                pg.execute("INSERT INTO t VALUES (%s)", [number])
                pg.execute("SELECT pg_logical_emit_message(true, 'app', %s)", [f"m{number}"])
        written.append(f"m{number}")

    def text(items):
        return [i.text for i in items if hasattr(i, "content")]

    handed, acked = read_lagging(pg_feed(pg_dsn, "t", **feed_args), lag=lag, stop_after=12)
    rest = drain(pg_feed(pg_dsn, "t", **{**feed_args,
                                        "checkpoint": FileCheckpoint(tmp_path / "checkpoint")}))
    delivered = text(acked) + text(rest)
    assert delivered == written, (text(acked), text(rest))


# -- Kafka records and Redis entries -----------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.parametrize("lag, stop_after", [(1, 4), (3, 8), (6, 10)])
def test_kafka_records_acknowledged_late_come_again(kafka_bootstrap, lag, stop_after):
    table = new_table()
    create_topic(kafka_bootstrap, table, 1)
    written = [insert(table, {"id": key}, key={"id": key}) for key in range(1, 16)]
    Pipeline(MemoryFeed(table, changes=written), [], sink=KafkaSink(kafka_bootstrap)).run()
    group = f"g-{uuid.uuid4().hex[:8]}"
    # (joining the group takes seconds: no idle timeout)
    handed, acked = read_lagging(KafkaFeed(kafka_bootstrap, table, group, config=FAST_GROUP),
                                 lag=lag, stop_after=stop_after, idle=None)
    assert ids(handed) == list(range(1, stop_after + 1))
    rest = []
    for change in KafkaFeed(kafka_bootstrap, table, group, config=FAST_GROUP).changes(
            limit=15 - len(acked), timeout=60):
        rest.append(change)
    assert ids(rest) == list(range(len(acked) + 1, 16))  # committed exactly what was acked


@pytest.mark.redis
@pytest.mark.parametrize("lag, stop_after", [(1, 4), (3, 8), (6, 10)])
def test_redis_entries_acknowledged_late_come_again(redis_url, lag, stop_after):
    stream = f"s-{uuid.uuid4().hex}"
    written = [insert("public.t", {"id": key}, key={"id": key}) for key in range(1, 16)]
    Pipeline(MemoryFeed("public.t", changes=written), [batch(5, 60)],
             sink=RedisStreamSink(redis_url, stream)).run()
    handed, acked = read_lagging(RedisStreamFeed(redis_url, stream, "g", "c1", count=4),
                                 lag=lag, stop_after=stop_after)
    assert ids(handed) == list(range(1, stop_after + 1))
    # (a Redis feed's idle is time alone: a wait long enough for the pending entries)
    rest = drain(RedisStreamFeed(redis_url, stream, "g", "c1", count=4), idle=2)
    assert ids(rest) == list(range(len(acked) + 1, 16))  # pending again: exactly the rest
    assert redis.Redis.from_url(redis_url).xpending(stream, "g")["pending"] == 0


def test_read_lagging_acknowledges_only_what_is_lag_behind():
    feed = MemoryFeed("t", changes=[insert("t", {"id": n}, key={"id": n}) for n in range(5)])
    handed, acked = read_lagging(feed, lag=2, stop_after=5)
    assert ids(handed) == [0, 1, 2, 3, 4] and ids(acked) == [0, 1, 2]
    assert feed.acknowledged == acked[-1].position

