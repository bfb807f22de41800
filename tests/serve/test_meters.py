"""The meters of a served pipeline, on real pipelines with in-memory feeds (and a real HTTP
receiver for retries): what they count equals what the sink received."""

from __future__ import annotations

import collections
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from testservers import Receiver
from waiting import wait_until

from changefeed.delivery import deliver
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    PipelineError,
    ResumeError,
    TransientBackendError,
)
from changefeed.formats.codec import dumps_line
from changefeed.pipelines import JsonLinesSink, Pipeline, to_delta
from changefeed.pipelines.sinks.http import WebhookSink
from changefeed.pipelines.stages import where
from changefeed.retry import Retry
from changefeed.serve.pipelines.meters import (
    LATENCY_BUCKETS,
    CountingRetry,
    Labeling,
    MeasuredOutput,
    MeasuredSink,
    SinkMeter,
)
from changefeed.serve.pipelines.worker import is_transient
from changefeed.testing import ListSink, MemoryFeed, delete, insert, update


def changes() -> list:
    return [
        insert("public.orders", {"id": 1, "total": 5}),
        insert("public.lines", {"id": 1, "qty": 2}),
        update("public.orders", {"id": 1, "total": 7}, {"id": 1}),
        insert("public.orders", {"id": 2, "total": 1}, snapshot=True),
        delete("public.lines", {"id": 1}),
        insert("public.orders", {"id": 3, "total": 0}),
    ]


def counted(meter: SinkMeter) -> dict[tuple[str, str], int]:
    return {(table, op): count for table, op, count in meter.current()["delivered"]}


@pytest.mark.parametrize(("processes", "workers"), [(False, 1), (True, 1), (True, 3)])
def test_the_sink_meter_counts_what_the_sink_received_by_table_and_operation(tmp_path, processes,
                                                                             workers):
    out = tmp_path / "out.jsonl"
    meter = SinkMeter()
    feed = MemoryFeed("public.orders", changes=changes())
    keep = where(lambda change: (change.new or change.old)["id"] != 3)
    pipeline = Pipeline(feed, [keep, Labeling(to_delta())],
                        sink=MeasuredSink(JsonLinesSink(str(out)), meter), processes=processes,
                        workers=workers, batch_size=2)
    assert pipeline.run() == 6
    wait_until(lambda: meter.current()["items"] >= 5, "a sink process's last report", 10)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    received = collections.Counter((d["model"], d["type"]) for d in lines)
    assert counted(meter) == {("public.orders", "insert"): 2, ("public.orders", "update"): 1,
                              ("public.lines", "insert"): 1, ("public.lines", "delete"): 1}
    assert {(t.split(".")[1], op): n for (t, op), n in counted(meter).items()} == received
    current = meter.current()
    assert current["items"] == len(lines) == 5
    assert current["bytes"] == out.stat().st_size
    assert current["snapshot_rows"] == [["public.orders", 1]]
    assert sum(current["buckets"]) >= 1 and current["latency_sum"] > 0
    assert current["retries"] == 0 and current["retrying_since"] is None


def test_items_that_are_not_changes_are_counted_without_labels():
    meter, sink = SinkMeter(), ListSink()
    feed = MemoryFeed("t", changes=[insert("t", {"id": 1}), insert("t", {"id": 2})])
    to_dicts = lambda change: [{"id": change.new["id"]}, {"copy": True}]  # noqa: E731
    Pipeline(feed, [to_dicts, Labeling(None)], sink=MeasuredSink(sink, meter)).run()
    assert sink.items == [{"id": 1}, {"copy": True}, {"id": 2}, {"copy": True}]
    assert counted(meter) == {("", ""): 4}


def test_a_format_stage_that_fails_fails_as_that_stage_and_is_dead_lettered(tmp_path):
    meter, dead = SinkMeter(), tmp_path / "dead.jsonl"
    feed = MemoryFeed("t", changes=[insert("t", {"id": 1}), insert("t", {"id": 2})])
    not_a_change = lambda change: {"id": change.new["id"]} if change.new["id"] == 2 else change  # noqa: E731,E501
    letters = MeasuredSink(JsonLinesSink(str(dead)), meter, dead_letters=True)
    sink = ListSink()
    Pipeline(feed, [not_a_change, Labeling(to_delta())], sink=MeasuredSink(sink, meter),
             dead_letter=letters).run()
    (record,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert record["stage"] == "to_delta(model=None)"
    assert [d["data"]["id"] for d in sink.items] == [1]
    assert meter.current()["dead_letters"] == 1 and meter.current()["items"] == 1


def test_retries_of_the_sink_are_counted_and_retrying_ends_with_the_next_delivery():
    receiver = Receiver(fail_first=2).start()
    try:
        meter = SinkMeter()
        hook = WebhookSink(receiver.url, retry=Retry(initial=0.01, maximum=0.02, attempts=5))
        sink = MeasuredSink(hook, meter)
        assert isinstance(hook.retry, CountingRetry)
        feed = MemoryFeed("t", changes=[insert("t", {"id": 1})])
        Pipeline(feed, [Labeling(to_delta())], sink=sink).run()
        assert len(receiver.accepted()) == 1
        current = meter.current()
        assert current["retries"] == 2 and current["retrying_since"] is None
        assert current["items"] == 1
    finally:
        receiver.stop()


def test_a_batch_in_retry_says_since_when():
    meter = SinkMeter()
    before = time.time()
    meter.retried()
    meter.retried()
    current = meter.current()
    assert current["retries"] == 2 and before <= current["retrying_since"] <= time.time()


def test_latency_falls_in_the_buckets():
    meter = SinkMeter()
    for seconds in (0.001, 0.2, 0.2, 100.0):
        meter.failed_batch(seconds)
    buckets = meter.current()["buckets"]
    assert buckets[0] == 1 and buckets[LATENCY_BUCKETS.index(0.25)] == 2 and buckets[-1] == 1
    assert meter.current()["latency_sum"] == pytest.approx(100.401)


def test_lag_is_the_age_of_the_oldest_change_not_delivered_and_zero_when_none_waits():
    release = threading.Event()
    received = []

    def slow_sink(item):
        release.wait(30)
        received.append(item)

    committed = datetime.now(timezone.utc) - timedelta(seconds=20)
    feed = MemoryFeed("t", changes=[insert("t", {"id": i}, committed_at=committed)
                                    for i in range(3)], endless=True)
    meter = SinkMeter()
    output = MeasuredOutput(Pipeline(feed, [Labeling(None)],
                                     sink=MeasuredSink(slow_sink, meter)).output())
    runner = threading.Thread(target=deliver, args=(feed, output), daemon=True)
    runner.start()
    wait_until(lambda: output.read >= 3, "the three changes read", 10)
    first = output.lag_seconds()
    time.sleep(0.3)  # time passes while the sink holds the batch
    assert 20 <= first < output.lag_seconds() < 40  # rises while the sink holds the batch
    release.set()
    wait_until(lambda: not output.lag_seconds(), "the lag to fall to 0", 10)
    assert output.lag_seconds() == 0.0 and len(received) == 3
    feed.stop()
    runner.join(10)
    assert output.read == 3 and output.handled == 3


def test_bytes_are_the_json_lines_the_sink_got():
    meter, sink = SinkMeter(), ListSink()
    feed = MemoryFeed("t", changes=[insert("t", {"id": 1, "name": "é"})])
    Pipeline(feed, [Labeling(to_delta("Thing"))], sink=MeasuredSink(sink, meter)).run()
    assert meter.current()["bytes"] == len(dumps_line(sink.items[0]))


@pytest.mark.parametrize("error, transient", [
    (ConfigurationError("table 'x' does not exist"), False),
    (ResumeError("the slot was invalidated"), False),
    (PipelineError("stage shout failed on the change at position 3: ValueError"), False),
    (PipelineError("sink webhook(http://h/x) failed on the batch at position 3: 503"), True),
    (TransientBackendError("connection lost"), True),
    (PermanentBackendError("permission denied for table x"), False),
    (RuntimeError("a bug"), True),
])
def test_which_failures_a_restart_may_cure(error, transient):
    assert is_transient(error) is transient


def test_a_source_that_was_never_reached_is_worth_restarting():
    class Feed:
        def is_transient(self, exc):
            return isinstance(exc, ConnectionRefusedError)

    refused = PermanentBackendError("cannot connect")
    refused.__cause__ = TransientBackendError("cannot connect to PostgreSQL at h:5432")
    assert is_transient(refused)
    driver = PermanentBackendError("ConnectionRefusedError")
    driver.__cause__ = ConnectionRefusedError()
    assert is_transient(driver, Feed())
    other = PermanentBackendError("KeyError")
    other.__cause__ = KeyError("x")
    assert not is_transient(other, Feed())
