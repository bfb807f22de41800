"""`KafkaSink` against a real broker (Tansu started by the test setup, or
CHANGEFEED_TEST_KAFKA_BOOTSTRAP): sink -> topic (keys, headers, formats, delivery confirmed), a
broker down and restarted, and `changefeed run --sink kafka://` killed with SIGKILL. What a
worker reads back is tests/backends/test_kafka_feed.py's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import uuid

import orjson
import psycopg
import pytest
from clitools import assert_one_clear_line, run_cli, start_cli
from kafkatools import changes_of, new_table, read_topic
from testservers import KAFKA_ENV, start_tansu
from waiting import wait_until

from changefeed.errors import PipelineError
from changefeed.pipelines import Batch, Pipeline
from changefeed.pipelines.sinks.kafka import KafkaSink
from changefeed.pipelines.sinks.spec import sink_from_spec
from changefeed.testing import MemoryFeed, insert

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("fmt", ["change", "delta", "debezium"])
def test_records_are_keyed_by_primary_key_in_commit_order_with_headers(kafka_bootstrap, fmt):
    table = new_table()
    feed = MemoryFeed(table, changes=changes_of(table))
    Pipeline(feed, [], sink=KafkaSink(kafka_bootstrap, fmt=fmt)).run()
    assert feed.checkpoint.load(table) == 5  # acknowledged once Kafka confirmed every record

    expected = 6 if fmt == "debezium" else 5  # Debezium follows a delete with a tombstone
    records = read_topic(kafka_bootstrap, table, lambda r: len(r) >= expected)
    assert len(records) == expected
    by_key: dict[bytes, list] = {}
    for record in records:
        by_key.setdefault(record.key(), []).append(record)
    assert set(by_key) == {b'{"id":1}', b'{"id":2}'}
    for same_key in by_key.values():  # one partition per key, so per-key order holds
        assert len({r.partition() for r in same_key}) == 1
    ones = [dict(r.headers()) for r in by_key[b'{"id":1}']]
    assert [h["operation"] for h in ones] == [b"insert", b"update", b"update"]
    assert [json.loads(h["position"]) for h in ones] == [1, 3, 5]
    assert all(h["table"] == table.encode() and h["format"] == fmt.encode() for h in ones)
    values = [orjson.loads(r.value()) for r in by_key[b'{"id":1}']]
    if fmt == "change":
        assert [v["new"]["title"] for v in values] == ["one", "uno", "eins"]
        assert values[1]["old"] == {"id": 1} and values[1]["position"] == 3
    elif fmt == "delta":
        assert values[0] == {"type": "insert", "model": table.rpartition(".")[2],
                             "data": {"id": 1, "title": "one"}}
        assert values[2]["type"] == "update" and values[2]["newData"]["title"] == "eins"
    else:
        assert [v["op"] for v in values] == ["c", "u", "u"]
        assert values[2]["after"] == {"id": 1, "title": "eins"}
        twos = by_key[b'{"id":2}']
        assert orjson.loads(twos[1].value())["op"] == "d" and twos[2].value() is None


def test_an_unreachable_broker_fails_the_batch_with_one_clear_error(tmp_path):
    from testservers import refused_port

    sink = KafkaSink(f"127.0.0.1:{refused_port()}", timeout=2)
    table = new_table()
    with pytest.raises(PipelineError) as failure:
        sink.write_batch(Batch(changes_of(table)[:2], [1, 2]))
    assert "did not confirm the batch within 2 s" in str(failure.value)
    assert "\n" not in str(failure.value)


def test_secrets_stay_out_of_names_and_errors():
    sink = sink_from_spec("kafka://app:s3cret@127.0.0.1:1/?topic=cdc.{name}&mechanism=SCRAM-SHA-256")
    assert "s3cret" not in sink.name and "://***@" in sink.name
    assert sink.config["sasl.mechanism"] == "SCRAM-SHA-256" and sink.topic == "cdc.{name}"


def test_a_broker_restart_loses_no_confirmed_record(tmp_path, caplog):
    """While the broker is down the sink retries; a batch it cannot get confirmed within its
    bound fails with one clear line (so the pipeline acknowledges nothing of it), and a
    pipeline restarted after that writes it again. Tansu's storage here is memory: a restarted
    Tansu is empty and knows no producer ids, so the idempotent producer that outlived it may
    be refused; a real broker (CHANGEFEED_TEST_KAFKA_BOOTSTRAP) keeps both."""
    if os.environ.get(KAFKA_ENV):
        pytest.skip("restarts a broker of its own (Tansu)")
    broker = start_tansu(tmp_path)
    try:
        table = new_table()
        changes = changes_of(table)
        sink = KafkaSink(broker.url, timeout=4)
        sink.write_batch(Batch(changes[:2], [1, 2]))
        broker.stop()
        errors: list[BaseException] = []

        def write() -> None:
            try:
                sink.write_batch(Batch(changes[2:], [3, 4, 5]))
            except PipelineError as exc:
                errors.append(exc)

        with caplog.at_level(logging.WARNING, logger="changefeed.kafka"):
            writer = threading.Thread(target=write)
            writer.start()
            wait_until(lambda: "brokers are down" in caplog.text,
                       "the producer to notice the broker is gone", 30)
            assert "brokers are down" in caplog.text
            broker.restart()
            writer.join(60)
        assert not writer.is_alive()
        if errors:  # not confirmed: the pipeline stops unacknowledged, and a new run resends
            assert "did not confirm the batch within 4 s" in str(errors[0])
            assert "\n" not in str(errors[0])
            retry = KafkaSink(broker.url, timeout=30)
            retry.write_batch(Batch(changes[2:], [3, 4, 5]))
            retry.close()
        records = read_topic(broker.url, table, lambda r: len(r) >= 3)
        assert sorted(json.loads(dict(r.headers())["position"]) for r in records) == [3, 4, 5]
    finally:
        broker.stop()


@pytest.mark.postgres
@pytest.mark.slow
def test_sigkill_of_changefeed_run_with_a_kafka_sink_loses_nothing(
    kafka_bootstrap, pg_dsn, pg, tmp_path
):
    """`changefeed run --sink kafka://` killed with SIGKILL while a writer commits, then
    restarted: the topic holds every committed change (repeats allowed, losses not). With
    ``--checkpoint`` the restarted run skips what was acknowledged, so an acknowledgement made
    before Kafka confirmed would show as a loss here."""
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
    topic = f"cdc.items_{uuid.uuid4().hex[:8]}"
    checkpoint = tmp_path / "checkpoint.json"
    args = ["run", "items", "--url", pg_dsn, "--format", "change", "-q",
            "--checkpoint", str(checkpoint),
            # A long linger holds records in the producer: only waiting for the broker's
            # confirmations before acknowledging keeps them from being lost in the kill.
            "--sink", f"kafka://{kafka_bootstrap}?topic={topic}&linger.ms=2000"]
    assert run_cli(*args, "--until-idle", "0.5").returncode == 0  # creates the slot
    committed: list[tuple[str, int]] = []
    done, killed = threading.Event(), threading.Event()

    def writer() -> None:
        # Writes until the feed was killed (so changes are in flight when it dies), then 20
        # transactions more for the restarted feed; paced so the topic's reader keeps up.
        after_kill = 0
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for batch in range(3000):
                if killed.wait(0.01):
                    after_kill += 1
                    if after_kill > 20:
                        break
                with conn.transaction():
                    for row in range(5):
                        key = batch * 5 + row
                        conn.execute("INSERT INTO items VALUES (%s, 0)", [key])
                        conn.execute("UPDATE items SET n = 1 WHERE id = %s", [key])
                committed.extend([("insert", batch * 5 + r) for r in range(5)]
                                 + [("update", batch * 5 + r) for r in range(5)])
        done.set()

    def received(records) -> set[tuple[str, int]]:
        return {(dict(r.headers())["operation"].decode(), orjson.loads(r.key())["id"])
                for r in records}

    process = start_cli(*args)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # Kill it while the writer is busy, once some of the stream is in Kafka and then one
        # more acknowledgement was made (the moment an early acknowledgement would be lost).
        read_topic(kafka_bootstrap, topic, lambda r: len(r) >= 200)
        # The first acknowledgement may still be on its way to the file (saves are throttled).
        acknowledged = wait_until(lambda: checkpoint.exists() and checkpoint.read_text(),
                                  "a first acknowledgement", 30, step=0.01)
        wait_until(lambda: checkpoint.read_text() != acknowledged, "one more acknowledgement",
                   30, step=0.01)
        process.stop(signal.SIGKILL, timeout=10)
        killed_while_writing = not done.is_set()
        killed.set()
        process = start_cli(*args)
        thread.join(120)
        assert done.is_set()
        wanted = set(committed)
        records = read_topic(kafka_bootstrap, topic, lambda r: received(r) >= wanted, timeout=120)
        assert received(records) >= wanted, sorted(wanted - received(records))[:10]
        assert killed_while_writing, "the writer finished before the kill: nothing was tested"
    finally:
        returncode, _ = process.stop(timeout=30)
    assert returncode == 0, process.stderr


@pytest.mark.parametrize(("spec", "fragment"), [
    ("kafka://", "a Kafka sink needs brokers"),
    ("kafka://127.0.0.1:1?topic={table", "bad topic template"),
    ("kafka://127.0.0.1:1?topic={tabel}", "bad topic template"),
    ("kafka://u:hunter2@127.0.0.1:1?topic={nope}", "bad topic template"),
])
def test_bad_kafka_sink_specs_are_one_clear_line(spec, fragment):
    result = run_cli("run", "tasks", "--url", "postgresql://127.0.0.1:1/x", "--sink", spec)
    assert_one_clear_line(result, fragment)
    assert "hunter2" not in result.stderr
    assert result.returncode == 2


def test_a_table_name_that_is_no_topic_name_fails_before_anything_is_acknowledged():
    feed = MemoryFeed("public.bad table", changes=[insert("public.bad table", {"id": 1},
                                                          key={"id": 1})])
    with pytest.raises(PipelineError, match="is not a Kafka topic name"):
        Pipeline(feed, [], sink=KafkaSink("127.0.0.1:1")).run()
    assert feed.checkpoint.load("public.bad table") is None


@pytest.mark.postgres
def test_changefeed_run_with_the_broker_down_fails_clearly_and_acknowledges_nothing(
    kafka_bootstrap, pg_dsn, pg
):
    from testservers import refused_port

    pg.execute("CREATE TABLE items (id int PRIMARY KEY)")
    assert run_cli("run", "items", "--url", pg_dsn, "--until-idle", "0.5").returncode == 0
    pg.execute("INSERT INTO items VALUES (1)")
    topic = f"cdc.items_{uuid.uuid4().hex[:8]}"
    down = run_cli("run", "items", "--url", pg_dsn, "--format", "change", "--sink",
                   f"kafka://user:hunter2@127.0.0.1:{refused_port()}?topic={topic}&timeout=2")
    assert_one_clear_line(down, "Kafka did not confirm the batch within 2 s")
    assert down.returncode == 5 and "hunter2" not in down.stderr
    # Nothing was acknowledged: with the broker there, the same change arrives.
    up = run_cli("run", "items", "--url", pg_dsn, "--format", "change", "--limit", "1", "--sink",
                 f"kafka://{kafka_bootstrap}?topic={topic}")
    assert up.returncode == 0, up.stderr
    [record] = read_topic(kafka_bootstrap, topic, lambda r: len(r) >= 1)
    assert orjson.loads(record.value())["new"] == {"id": 1}
