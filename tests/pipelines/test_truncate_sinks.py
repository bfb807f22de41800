"""A `Truncate` through every sink, against real servers: Kafka (Tansu: on every partition, in
order with each partition's changes, read back by `KafkaFeed`), Redis (read back by
`RedisStreamFeed`), a webhook, a JSON-lines file, and a real Snorky server (which has no
truncate delta: left out with a warning, the rest delivered). The PostgreSQL end is in
tests/test_guarantees.py."""

from __future__ import annotations

import json
import logging
import uuid

import orjson
import pytest
from kafkatools import FAST_GROUP, create_topic, new_table, read_topic
from testservers import SNORKY_KEY, received, subscribe

from changefeed import Operation, Truncate
from changefeed.backends.kafka import KafkaFeed
from changefeed.backends.redis_streams import RedisStreamFeed
from changefeed.pipelines import Pipeline, to_delta
from changefeed.pipelines.sinks import JsonLinesSink
from changefeed.pipelines.sinks.http import SnorkySink, WebhookSink
from changefeed.pipelines.sinks.kafka import KafkaSink
from changefeed.pipelines.sinks.redis import RedisStreamSink
from changefeed.testing import ListSink, MemoryFeed, insert


def items_of(table: str) -> list:
    """Six rows, the table truncated, two more: positions 1..9."""
    before = [insert(table, {"id": i}, key={"id": i}) for i in range(1, 7)]
    after = [insert(table, {"id": i}, key={"id": i}) for i in (7, 8)]
    return [*before, Truncate(table, cascade=True), *after]


@pytest.mark.kafka
@pytest.mark.parametrize("fmt", ["change", "debezium", "delta"])
def test_kafka_writes_a_truncate_to_every_partition_in_order(kafka_bootstrap, fmt):
    table = new_table()
    create_topic(kafka_bootstrap, table, 3)
    feed = MemoryFeed(table, changes=items_of(table))
    Pipeline(feed, [], sink=KafkaSink(kafka_bootstrap, fmt=fmt)).run()
    assert feed.checkpoint.load(table) == 9

    records = read_topic(kafka_bootstrap, table, lambda r: len(r) >= 8 + 3)
    assert len(records) == 8 + 3
    by_partition: dict[int, list] = {}
    for record in sorted(records, key=lambda r: (r.partition(), r.offset())):
        by_partition.setdefault(record.partition(), []).append(record)
    assert sorted(by_partition) == [0, 1, 2]
    for partition in by_partition.values():
        positions = [json.loads(dict(r.headers())["position"]) for r in partition]
        truncates = [r for r in partition if dict(r.headers())["operation"] == b"truncate"]
        assert len(truncates) == 1 and truncates[0].key() is None
        assert positions == sorted(positions) and 7 in positions  # in order, the truncate 7th
        value = orjson.loads(truncates[0].value())
        if fmt == "change":
            assert value == {"operation": "truncate", "table": table, "position": 7,
                             "committed_at": None, "transaction": None, "cascade": True,
                             "restart_identity": False}
        elif fmt == "debezium":
            assert value["op"] == "t" and value["after"] is None and value["before"] is None
            assert value["source"]["table"] == table.rpartition(".")[2]
        else:
            assert value == {"type": "truncate", "model": table.rpartition(".")[2]}

    if fmt == "delta":
        return  # a delta cannot be read back
    worker = KafkaFeed(kafka_bootstrap, table, f"g-{uuid.uuid4().hex[:8]}", config=FAST_GROUP)
    sink = ListSink()
    Pipeline(worker, [], sink=sink).run(limit=11, timeout=60)
    truncates = [item for item in sink if isinstance(item, Truncate)]
    assert len(sink) == 11 and len(truncates) == 3  # one per partition
    assert {t.table for t in truncates} == {table}
    assert all(t.meta["source_position"] == (7 if fmt == "change" else None) for t in truncates)
    only_rows = KafkaFeed(kafka_bootstrap, table, f"g-{uuid.uuid4().hex[:8]}",
                          Operation.INSERT, config=FAST_GROUP)
    rows = ListSink()
    Pipeline(only_rows, [], sink=rows).run(limit=8, timeout=60)
    assert len(rows) == 8 and not any(isinstance(item, Truncate) for item in rows)


@pytest.mark.redis
def test_redis_holds_a_truncate_as_an_entry_read_back_in_order(redis_url):
    stream = f"s-{uuid.uuid4().hex[:8]}"
    table = "public.tasks"
    feed = MemoryFeed(table, changes=items_of(table))
    Pipeline(feed, [], sink=RedisStreamSink(redis_url, stream)).run()
    assert feed.checkpoint.load(table) == 9
    worker = RedisStreamFeed(redis_url, stream, group="g", consumer="c1")
    sink = ListSink()
    Pipeline(worker, [to_delta("Task")], sink=sink).run(idle_timeout=2, timeout=60)
    assert [d["type"] for d in sink] == ["insert"] * 6 + ["truncate"] + ["insert"] * 2
    assert sink.items[6] == {"type": "truncate", "model": "Task"}


def test_a_webhook_and_a_file_receive_the_truncate_as_its_dict(receiver, tmp_path):
    table = "public.tasks"
    feed = MemoryFeed(table, changes=items_of(table))
    Pipeline(feed, [], sink=WebhookSink(receiver.url)).run()
    bodies = [json.loads(body) for _, body in receiver.accepted()]
    sent = [item for body in bodies for item in body]
    assert [item["operation"] for item in sent] == ["insert"] * 6 + ["truncate"] + ["insert"] * 2
    assert sent[6]["table"] == table and sent[6]["cascade"] is True

    path = tmp_path / "out.jsonl"
    again = MemoryFeed(table, changes=items_of(table))
    Pipeline(again, [], sink=JsonLinesSink(str(path))).run()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == sent


def test_snorky_gets_the_rest_and_the_truncate_is_said_on_stderr(snorky, caplog):
    table = "public.tasks"
    with subscribe(snorky, "AllTasks", None) as everything:
        feed = MemoryFeed(table, changes=items_of(table))
        sink = SnorkySink(f"{snorky}/backend", key=SNORKY_KEY, model="Task")
        with caplog.at_level(logging.WARNING, "changefeed.pipelines"):
            Pipeline(feed, [], sink=sink).run()
        assert feed.checkpoint.load(table) == 9  # delivered: nothing stops at it
        got = received(everything, 8)
    assert [d["data"]["id"] for d in got] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "TRUNCATE of public.tasks at position 7 is not sent: Snorky has no delta" in caplog.text


@pytest.mark.postgres
def test_the_sync_shape_log_turns_a_truncate_into_deletes_clients_follow(pg, pg_dsn):
    # `changefeed serve TABLE`: an Electric client (the real one, in Node) ends equal to the
    # table after TRUNCATEs, alone and beside inserts in one transaction, with and without a
    # where; before, a truncate never reached the shape log and clients kept every row.
    from tests.serve.synctools import Server, electric_rows, shape_clients

    pg.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO items SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END"
               " FROM generate_series(1, 30) g")
    wheres = [None, "v = 'a'"]
    with Server(pg_dsn, ["items"]).start() as server:
        clients = shape_clients(server, "items", [{"where": w} for w in wheres])
        try:
            def all_follow() -> None:
                for client, where in zip(clients, wheres, strict=True):
                    event = client.wait_rows(lambda w=where: electric_rows(pg, "items", w))
                    assert event["shapeRows"] == event["rows"]
                    assert client.refetches() == 0 and not client.errors()

            all_follow()
            with pg.transaction():  # rows logged before and in the same transaction go
                pg.execute("INSERT INTO items VALUES (31, 'a'), (32, 'b')")
                pg.execute("UPDATE items SET v = 'a' WHERE id = 1")
                pg.execute("TRUNCATE items")
                pg.execute("INSERT INTO items VALUES (2, 'a'), (40, 'b')")
            all_follow()
            assert len(electric_rows(pg, "items")) == 2
            pg.execute("TRUNCATE items")  # alone
            all_follow()
            pg.execute("INSERT INTO items VALUES (50, 'a')")
            all_follow()
            assert len(electric_rows(pg, "items")) == 1
        finally:
            clients[0].stop()
