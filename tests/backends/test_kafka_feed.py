"""`KafkaFeed` against a real broker (Tansu started by the test setup, or
CHANGEFEED_TEST_KAFKA_BOOTSTRAP): topic -> consumer-group workers, offsets committed only for
what a worker's sink delivered, a killed worker's partitions taken over, records it cannot read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafkatools import FAST_GROUP, changes_of, create_topic, new_table, wait_for_commits
from waiting import wait_until

from changefeed import Operation
from changefeed.backends.kafka import KafkaFeed
from changefeed.errors import DecodeError, PipelineError
from changefeed.pipelines import Pipeline
from changefeed.pipelines.sinks.kafka import KafkaSink
from changefeed.testing import ListSink, MemoryFeed, insert

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("fmt", ["change", "debezium"])
def test_a_worker_commits_only_what_its_sink_delivered(kafka_bootstrap, fmt):
    table = new_table()
    written = changes_of(table)
    Pipeline(MemoryFeed(table, changes=written), [], sink=KafkaSink(kafka_bootstrap, fmt=fmt)).run()
    group = f"g-{uuid.uuid4().hex[:8]}"
    delivered: list = []

    def fail_on_the_fourth(change) -> None:
        if len(delivered) == 3:
            raise RuntimeError("the worker's sink is down")
        delivered.append(change)

    first = KafkaFeed(kafka_bootstrap, table, group, config=FAST_GROUP)
    with pytest.raises(PipelineError, match="sink is down"):
        Pipeline(first, [], sink=fail_on_the_fourth).run(timeout=60)
    first.close()

    def identity(change) -> tuple:
        position = change.meta["source_position"] if change.meta else change.position
        return change.operation, change.key["id"], position if fmt == "change" else None

    wanted = {identity(w) for w in written}
    second = KafkaFeed(kafka_bootstrap, table, group, config=FAST_GROUP)
    rest = ListSink()

    def collect(change) -> None:
        rest(change)
        if {identity(c) for c in delivered + rest.items} >= wanted:
            second.stop()

    Pipeline(second, [], sink=collect).run(timeout=60)
    second.close()
    # The fourth change reached no sink: it comes again; nothing is lost, repeats are allowed.
    seen = delivered + rest.items
    assert {identity(c) for c in seen} >= wanted
    assert rest.items and all(c.position.startswith(f"{table}:") for c in rest.items)
    last = [c for c in seen if c.key == {"id": 1}][-1]
    assert last.new == {"id": 1, "title": "eins"}
    # Debezium has no "before" for an update under REPLICA IDENTITY DEFAULT (only the key).
    assert last.old == ({"id": 1} if fmt == "change" else None)


def test_runs_that_stop_after_a_few_records_go_on_where_the_last_one_stopped(kafka_bootstrap):
    table = new_table()
    create_topic(kafka_bootstrap, table, 1)  # one partition: one order to check
    written = [insert(table, {"id": key}, key={"id": key}) for key in range(1, 11)]
    Pipeline(MemoryFeed(table, changes=written), [], sink=KafkaSink(kafka_bootstrap)).run()
    group = f"g-{uuid.uuid4().hex[:8]}"
    runs = []
    for stop_after in (3, 3, 1, 3):  # (joining the group takes seconds: no idle timeout)
        feed = KafkaFeed(kafka_bootstrap, table, group, config=FAST_GROUP)
        sink = ListSink()
        Pipeline(feed, [], sink=sink).run(limit=stop_after, timeout=60)
        feed.close()
        runs.append([change.key["id"] for change in sink.items])
    assert runs == [[1, 2, 3], [4, 5, 6], [7], [8, 9, 10]]


def test_a_worker_filters_by_operation(kafka_bootstrap):
    table = new_table()
    Pipeline(MemoryFeed(table, changes=changes_of(table)), [],
             sink=KafkaSink(kafka_bootstrap)).run()
    feed = KafkaFeed(kafka_bootstrap, table, f"g-{uuid.uuid4().hex[:8]}",
                     Operation.DELETE | Operation.INSERT, config=FAST_GROUP)
    out = ListSink()
    Pipeline(feed, [], sink=out).run(limit=3, timeout=60)
    feed.close()
    # Keys 1 and 2 may sit in different partitions: order holds per key, not across them.
    assert sorted((c.operation, c.key["id"]) for c in out.items) == [
        (Operation.INSERT, 1), (Operation.INSERT, 2), (Operation.DELETE, 2)]


def _positions(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["position"] for line in path.read_text().splitlines() if line]


def test_a_killed_worker_s_partitions_go_to_the_other(kafka_bootstrap, tmp_path):
    table = new_table()
    create_topic(kafka_bootstrap, table, 4)
    group = f"g-{uuid.uuid4().hex[:8]}"

    def produce(start: int, stop: int) -> None:
        changes = [insert(table, {"id": i}, key={"id": i}, position=i) for i in range(start, stop)]
        Pipeline(MemoryFeed(table, changes=changes), [], sink=KafkaSink(kafka_bootstrap)).run()

    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    worker = str(Path(__file__).with_name("kafka_worker.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [subprocess.Popen([sys.executable, worker, kafka_bootstrap, table, group, str(out)],
                                stderr=subprocess.DEVNULL, env=env) for out in outs]
    try:
        produce(1, 41)
        wait_until(lambda: all(_positions(out) for out in outs)
                   and len({p for out in outs for p in _positions(out)}) >= 40,
                   "both workers sharing the work and all 40 in", 60, step=0.1)
        owned_by_a = {p.rsplit(":", 2)[1] for p in _positions(outs[0])}
        assert owned_by_a and _positions(outs[1]), "the two workers did not share the topic"
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        produce(41, 81)
        wanted = set(range(1, 81))

        def seen_ids() -> set[int]:
            return {json.loads(line)["key"]["id"] for out in outs if out.exists()
                    for line in out.read_text().splitlines() if line}

        wait_until(lambda: seen_ids() >= wanted, "every record delivered", 90, step=0.2)
        seen = seen_ids()
        assert seen >= wanted, sorted(wanted - seen)
        taken = _positions(outs[1])
        taken_over = {p.rsplit(":", 2)[1] for p in taken}
        assert owned_by_a <= taken_over  # b processed records of every partition a had
        # ... and commits, after the rebalance too, every partition up to what it delivered.
        produce(81, 101)
        wait_until(lambda: len(_positions(outs[1])) >= len(taken) + 20,
                   "b's next 20 records", 60, step=0.1)
        ends: dict[int, int] = {}
        for position in _positions(outs[0]) + _positions(outs[1]):
            partition, offset = map(int, position.rsplit(":", 2)[1:])
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        assert wait_for_commits(kafka_bootstrap, group, table, ends), "offsets not committed"
    finally:
        for process in workers:
            if process.poll() is None:
                process.terminate()
                process.wait(20)


@pytest.mark.parametrize(("value", "headers", "fragment"), [
    (b"not json", [("format", b"change")], "is not a change record"),
    (b'{"op": "x"}', [("format", b"debezium")], "is not a debezium record"),
    (b'{"type": "insert"}', [("format", b"delta")], "holds a 'delta' record"),
])
def test_a_record_the_feed_cannot_read_stops_it_with_one_clear_error(
    kafka_bootstrap, value, headers, fragment
):
    from confluent_kafka import Producer

    topic = new_table()
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, value=value, key=b'{"id":1}', headers=headers)
    assert producer.flush(30) == 0
    feed = KafkaFeed(kafka_bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}", config=FAST_GROUP)
    with pytest.raises(DecodeError, match=f"{topic}\\[.*{fragment}") as failure:
        Pipeline(feed, [], sink=ListSink()).run(timeout=60)
    feed.close()
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize("fmt", ["change", "debezium"])
def test_the_records_before_one_the_feed_cannot_read_are_delivered_and_committed(
    kafka_bootstrap, fmt
):
    """A malformed record is the source's failure (`DecodeError`, exit 3), not the sink's: the
    output delivers what came before it, that is committed, and the next run stops at the same
    record again, neither repeating the ones before nor skipping it."""
    from confluent_kafka import Producer

    table = new_table()
    create_topic(kafka_bootstrap, table, 1)  # one partition: one order
    good = [insert(table, {"id": i}, key={"id": i}, position=i) for i in (1, 2, 3)]
    Pipeline(MemoryFeed(table, changes=good), [], sink=KafkaSink(kafka_bootstrap, fmt=fmt)).run()
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(table, value=b'{"cut short', key=b'{"id":4}', headers=[("format", fmt)])
    assert producer.flush(30) == 0
    after = [insert(table, {"id": 5}, key={"id": 5}, position=5)]
    Pipeline(MemoryFeed(table, changes=after), [], sink=KafkaSink(kafka_bootstrap, fmt=fmt)).run()
    group = f"g-{uuid.uuid4().hex[:8]}"

    runs = []
    for _ in range(2):
        feed, sink = KafkaFeed(kafka_bootstrap, table, group, config=FAST_GROUP), ListSink()
        with pytest.raises(DecodeError, match=f"{table}\\[0\\]@3 is not a {fmt} record") as e:
            Pipeline(feed, [], sink=sink).run(timeout=60)
        feed.close()
        assert e.value.exit_code == 3 and "\n" not in str(e.value)
        runs.append([change.key["id"] for change in sink.items])
    assert runs == [[1, 2, 3], []]
    assert wait_for_commits(kafka_bootstrap, group, table, {0: 3}), "offsets not committed"
