"""``changefeed serve --config`` with real servers: PostgreSQL -> file, PostgreSQL -> webhook,
PostgreSQL -> Kafka, and Kafka read back -> Redis, in one process: every output complete,
``/metrics`` equal to what the sinks received and named by Prometheus' conventions, the health
details, ``changefeed status``, and JSON logs labelled per pipeline."""

from __future__ import annotations

import collections
import json
import re
import uuid
from pathlib import Path

import pytest
import redis
from clitools import run_cli
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families
from serving import Serve, jsonl

from changefeed.formats.records import change_of_entry
from changefeed.serve.pipelines.metrics import METRICS

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.redis]

FAST_GROUP = ("session.timeout.ms=6000&heartbeat.interval.ms=500&max.poll.interval.ms=6000"
              "&topic.metadata.refresh.interval.ms=1000")


@pytest.fixture
def shop(pg):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, total int, note text)")
    pg.execute("CREATE TABLE order_lines (id int PRIMARY KEY, order_id int, qty int)")
    pg.execute("INSERT INTO orders SELECT g, g * 10, 'before' FROM generate_series(1, 4) g")
    return pg


def activity(pg) -> None:
    """Inserts, updates and deletes in both tables, over several transactions."""
    with pg.transaction():
        pg.execute("INSERT INTO orders SELECT g, g * 10, 'new' FROM generate_series(5, 12) g")
        pg.execute("INSERT INTO order_lines SELECT g, g % 5 + 1, g FROM generate_series(1, 9) g")
    pg.execute("UPDATE orders SET total = total + 1 WHERE id IN (1, 2, 7)")
    pg.execute("UPDATE order_lines SET qty = 0 WHERE id <= 3")
    pg.execute("DELETE FROM orders WHERE id = 12")
    pg.execute("DELETE FROM order_lines WHERE id = 9")


def check_conventions(text: str) -> None:
    """Prometheus' naming conventions, read with prometheus_client's parser."""
    families = [f for f in text_string_to_metric_families(text)
                if f.name.startswith("changefeed_")]
    assert {f.name + ("_total" if f.type == "counter" else "") for f in families} == set(METRICS)
    for family in families:
        assert re.fullmatch(r"changefeed_[a-z0-9_]+", family.name), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= {"pipeline", "table", "operation", "side",
                                                   "state"}, sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
        if "seconds" in family.name or "bytes" in family.name:
            assert family.name.endswith(("_seconds", "_bytes")), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds")


def test_three_kinds_of_pipeline_deliver_everything_and_metrics_equal_the_sinks(
        tmp_path: Path, pg_dsn, shop, receiver, kafka_bootstrap, redis_url):
    topic, stream = f"lines_{uuid.uuid4().hex[:8]}", f"lines_{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})  # as an operator would
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    config = tmp_path / "changefeed.toml"
    config.write_text(f'''
[defaults]
url = "${{DATABASE_URL}}"

[pipelines.orders-to-file]
tables = ["orders", "order_lines"]
prefeed = "snapshot"
format = "change"
sink = "{tmp_path}/shop.jsonl"

[pipelines.orders-to-webhook]
tables = "orders"
ops = ["insert", "update"]
where = "total >= 50"
model = "Order"
sink = "{receiver.url}?token=${{HOOK_TOKEN}}"

[pipelines.lines-to-kafka]
tables = "order_lines"
format = "change"         # what a Kafka source reads back
sink = "kafka://{kafka_bootstrap}?topic={topic}"

[pipelines.kafka-to-redis]
url = "kafka://{kafka_bootstrap}?{FAST_GROUP}"
topics = ["{topic}"]
sink = "{redis_url}?stream={stream}"
''')
    token = "hook-s3cret-value"
    with Serve(config, env={"DATABASE_URL": pg_dsn, "HOOK_TOKEN": token},
               args=("--log-format", "json")) as serve:
        serve.wait_ready(timeout=120)
        activity(shop)
        serve.wait_until(lambda: len(jsonl(tmp_path / "shop.jsonl")) == 4 + 25,
                         "the file pipeline's changes")

        def webhook_ids() -> list:
            return [(d["type"], d.get("data", d.get("newData"))["id"])
                    for _, body in receiver.accepted() for d in json.loads(body)]

        serve.wait_until(lambda: len(webhook_ids()) == 9, "the webhook's deltas")
        client = redis.Redis.from_url(redis_url)
        serve.wait_until(lambda: client.xlen(stream) == 9 + 3 + 1, "the stream's entries",
                         timeout=90)

        # Every output is complete.
        changes = jsonl(tmp_path / "shop.jsonl")
        assert sum(c["snapshot"] for c in changes) == 4
        counted = collections.Counter((c["table"], c["operation"]) for c in changes)
        assert counted == {("public.orders", "insert"): 12, ("public.order_lines", "insert"): 9,
                           ("public.orders", "update"): 3, ("public.order_lines", "update"): 3,
                           ("public.orders", "delete"): 1, ("public.order_lines", "delete"): 1}
        assert sorted(webhook_ids()) == sorted(  # updates of 1 and 2 stay under 50
            [("insert", i) for i in range(5, 13)] + [("update", 7)])
        streamed = [change_of_entry(fields) for _, fields in client.xrange(stream)]
        assert collections.Counter(c.operation.name.lower() for c in streamed) == {
            "insert": 9, "update": 3, "delete": 1}
        assert {c.table for c in streamed} == {"public.order_lines"}

        # The metrics say what the sinks received.
        def delivered(pipeline: str) -> dict:
            return {(dict(labels)["table"], dict(labels)["operation"]): value
                    for (name, labels), value in serve.metrics().items()
                    if name == "changefeed_changes_delivered_total"
                    and dict(labels)["pipeline"] == pipeline}

        serve.wait_until(lambda: sum(delivered("kafka-to-redis").values()) == 13,
                         "the last report of the Kafka pipeline")
        assert delivered("orders-to-file") == counted
        assert delivered("orders-to-webhook") == {("public.orders", "insert"): 8,
                                                  ("public.orders", "update"): 1}
        assert delivered("lines-to-kafka") == {("public.order_lines", "insert"): 9,
                                               ("public.order_lines", "update"): 3,
                                               ("public.order_lines", "delete"): 1}
        assert delivered("kafka-to-redis") == delivered("lines-to-kafka")
        assert serve.metric("changefeed_delivered_bytes_total", pipeline="orders-to-file") == (
            (tmp_path / "shop.jsonl").stat().st_size)
        assert serve.metric("changefeed_changes_read_total", pipeline="orders-to-webhook") == 11
        assert serve.metric("changefeed_snapshot_rows_total", pipeline="orders-to-file",
                            table="public.orders") == 4
        batches = serve.metric("changefeed_sink_latency_seconds_count", pipeline="orders-to-file")
        assert batches >= 1 and serve.metric("changefeed_sink_latency_seconds_bucket",
                                             pipeline="orders-to-file", le="+Inf") == batches
        assert serve.metric("changefeed_pipeline_state", pipeline="kafka-to-redis",
                            state="streaming") == 1
        serve.wait_until(lambda: serve.metrics().get(("changefeed_wal_retained_bytes", frozenset(
            {("pipeline", "orders-to-file")}))) is not None, "the WAL figures")
        text = serve.get("/metrics")[1]
        check_conventions(text)
        assert token not in text

        # Health and status.
        status, health = serve.get("/readyz")
        assert status == 200 and health["status"] == "ready"
        pipelines = health["services"]["pipelines"]["pipelines"]
        assert list(pipelines) == ["orders-to-file", "orders-to-webhook", "lines-to-kafka",
                                   "kafka-to-redis"]
        assert all(p["state"] == "streaming" and p["ready"] for p in pipelines.values())
        assert pipelines["orders-to-file"]["delivered"] == 29
        assert "wal_retained_bytes" in pipelines["orders-to-file"]
        shown = run_cli("status", "--url", serve.url)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0].split() == ["SERVICE", "PIPELINE", "STATE", "READY", "DELIVERED", "LAG",
                                    "RESTARTS", "ERROR"]
        assert [line.split()[1:5] for line in lines[1:5]] == [
            ["orders-to-file", "streaming", "yes", "29"],
            ["orders-to-webhook", "streaming", "yes", "9"],
            ["lines-to-kafka", "streaming", "yes", "13"],
            ["kafka-to-redis", "streaming", "yes", "13"]]
        assert lines[-1] == "ready"
        assert serve.stop() == 0

    # JSON logs: one object per line, each pipeline's events labelled with it, no secret.
    records = [json.loads(line) for line in serve.log.splitlines()]
    assert all(set(r) == {"time", "level", "pipeline", "event", "fields"} for r in records)
    by_pipeline = collections.defaultdict(list)
    for record in records:
        by_pipeline[record["pipeline"]].append(record["event"])
    assert any(e.startswith("streaming public.orders, public.order_lines from slot "
                            "changefeed_orders_to_file") for e in by_pipeline["orders-to-file"])
    assert any(f"assigned {topic}[0]" in e for e in by_pipeline["kafka-to-redis"])
    assert any(e.startswith("serving on http://127.0.0.1") for e in by_pipeline[None])
    assert all(any(e == "stopped" for e in by_pipeline[name]) for name in pipelines)
    assert token not in serve.log and pg_dsn not in serve.log
