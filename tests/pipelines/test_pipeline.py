"""Pipelines end to end: feed -> stages -> sink -> what was delivered and what was acknowledged."""

from __future__ import annotations

import json
import os
import signal

import pytest

from changefeed import MemoryCheckpoint, PipelineError
from changefeed.pipelines import (
    CallbackSink,
    JsonLinesSink,
    Pipeline,
    batch,
    own_process,
    to_delta,
    where,
)
from changefeed.testing import ListSink, MemoryFeed, insert


def tasks(n: int, **options) -> MemoryFeed:
    """A feed of n inserts into tasks, at positions 1..n."""
    return MemoryFeed("tasks", changes=[insert("tasks", {"id": i}) for i in range(1, n + 1)],
                      **options)


def fail_on(*ids: int):
    def explode(change):
        if change.new["id"] in ids:
            raise ValueError(f"bad row {change.new['id']}")
        return change

    return explode


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- in-process ----------------------------------------------------------------------------------


def test_a_position_is_acknowledged_only_after_the_sink_has_its_change():
    feed = tasks(5)
    acknowledged_when_delivered = []

    def sink(delta):
        acknowledged_when_delivered.append((delta["data"]["id"], feed.checkpoint.load("tasks")))

    assert Pipeline(feed, [to_delta()], sink=sink, ack_interval=0).run() == 5
    assert all(ack is None or ack < i for i, ack in acknowledged_when_delivered)
    assert feed.checkpoint.positions == {"tasks": 5}


def test_dropped_changes_count_as_handled():
    feed = tasks(6)
    sink = ListSink()
    Pipeline(feed, [where(lambda c: c.new["id"] <= 2)], sink=sink).run()
    assert [c.new["id"] for c in sink] == [1, 2]
    assert feed.checkpoint.positions == {"tasks": 6}  # 3..6 were dropped: handled all the same


def test_one_change_can_become_several_items():
    sink = ListSink()
    Pipeline(tasks(2), [lambda c: [c.new["id"], -c.new["id"]]], sink=sink).run()
    assert sink.items == [1, -1, 2, -2]


def test_batch_groups_items_for_a_plain_callable_sink():
    sink = ListSink()
    Pipeline(tasks(7), [to_delta()], sink=sink, batch_size=3, batch_seconds=60).run()
    assert [[d["data"]["id"] for d in b] for b in sink] == [[1, 2, 3], [4, 5, 6], [7]]


def test_batch_sinks_get_positions_with_their_items():
    batches = []
    sink = CallbackSink(batches.append, batches=True)
    Pipeline(tasks(4), sink=sink, batch_size=2, batch_seconds=60).run()
    assert [(b.first, b.last, len(b)) for b in batches] == [(1, 2, 2), (3, 4, 2)]


def test_a_quiet_feed_flushes_the_waiting_batch():
    feed = tasks(0, endless=True)
    sink = ListSink()
    feed.push(insert("tasks", {"id": 1}))
    # A batch of 1000 never fills: the quiet moment after the first change delivers it.
    Pipeline(feed, sink=sink, batch_size=1000, batch_seconds=60).run(idle_timeout=0.6)
    assert [[c.new["id"] for c in b] for b in sink] == [[1]]
    assert feed.checkpoint.positions == {"tasks": 1}


def test_a_failing_stage_stops_the_pipeline_after_what_came_before():
    feed = tasks(5)
    sink = ListSink()
    with pytest.raises(PipelineError) as info:
        Pipeline(feed, [fail_on(3)], sink=sink).run()
    message = str(info.value)
    assert "stage explode" in message and "position 3" in message and "bad row 3" in message
    assert isinstance(info.value.__cause__, ValueError)
    assert [c.new["id"] for c in sink] == [1, 2]
    assert feed.checkpoint.positions == {"tasks": 2}  # nothing past the failure


def test_a_failing_sink_acknowledges_nothing_of_its_batch():
    feed = tasks(5)

    def sink(batch_):
        if any(c.new["id"] == 4 for c in batch_):
            raise ConnectionError("refused")

    with pytest.raises(PipelineError, match=r"sink sink failed on the batch at positions 3..4"):
        Pipeline(feed, sink=sink, batch_size=2, batch_seconds=60).run()
    assert feed.checkpoint.positions == {"tasks": 2}


def test_dead_letters_take_failed_changes_and_the_pipeline_goes_on():
    feed = tasks(4)
    sink, dead = ListSink(), ListSink()
    Pipeline(feed, [fail_on(2), to_delta()], sink=sink, dead_letter=dead).run()
    assert [d["data"]["id"] for d in sink] == [1, 3, 4]
    assert len(dead) == 1
    record = dead.items[0]
    assert record["stage"] == "explode" and record["error"] == "ValueError: bad row 2"
    assert record["change"]["new"] == {"id": 2} and record["change"]["position"] == 2
    assert feed.checkpoint.positions == {"tasks": 4}


def test_dead_letters_take_the_changes_of_a_failed_sink_batch():
    feed = tasks(4)
    dead = ListSink()

    def sink(batch_):
        if batch_[0]["data"]["id"] == 3:
            raise RuntimeError("full")

    Pipeline(feed, [to_delta()], sink=sink, dead_letter=dead, batch_size=2,
             batch_seconds=60).run()
    assert [(r["change"]["position"], r["stage"], r["error"]) for r in dead] == [
        (3, "sink", "RuntimeError: full"), (4, "sink", "RuntimeError: full")
    ]
    assert feed.checkpoint.positions == {"tasks": 4}


def test_restart_resumes_after_the_checkpoint():
    checkpoint = MemoryCheckpoint()
    first, second = ListSink(), ListSink()
    Pipeline(tasks(5, checkpoint=checkpoint), [], sink=first).run(limit=3)
    Pipeline(tasks(5, checkpoint=checkpoint), [], sink=second).run()
    assert [c.new["id"] for c in first] == [1, 2, 3]
    assert [c.new["id"] for c in second] == [4, 5]


def test_batch_must_come_last():
    from changefeed import ConfigurationError

    with pytest.raises(ConfigurationError, match="last"), pytest.deprecated_call():
        Pipeline(tasks(1), [batch(2), to_delta()], sink=ListSink())


def test_a_batch_stage_last_still_batches_with_a_deprecation_warning():
    sink = ListSink()
    with pytest.deprecated_call(match="batch_size"):
        stages = [to_delta(), batch(size=3, seconds=60)]
    Pipeline(tasks(7), stages, sink=sink).run()
    assert [len(items) for items in sink.items] == [3, 3, 1]


def test_batching_given_twice_is_refused():
    from changefeed import ConfigurationError

    with pytest.deprecated_call(), pytest.raises(ConfigurationError, match="twice"):
        Pipeline(tasks(1), [batch(2)], sink=ListSink(), batch_size=2)


# -- multi-process -------------------------------------------------------------------------------


def test_processes_deliver_everything_and_acknowledge_it(tmp_path):
    feed = tasks(300)
    out = tmp_path / "out.jsonl"
    pipeline = Pipeline(feed, [where(lambda c: c.new["id"] % 3), to_delta()],
                        sink=JsonLinesSink(out), processes=True, batch_size=50, batch_seconds=60)
    assert pipeline.multiprocess
    assert pipeline.run() == 300
    assert [d["data"]["id"] for d in lines(out)] == [i for i in range(1, 301) if i % 3]
    assert feed.checkpoint.positions == {"tasks": 300}


class FailingFileSink(JsonLinesSink):
    """Writes batches to a file, and raises on the batch holding a given id (in its process)."""

    def __init__(self, path, fail_id):
        super().__init__(path)
        self.fail_id = fail_id

    def write_batch(self, batch_):
        if any(c.new["id"] == self.fail_id for c in batch_.items):
            raise OSError("disk full")
        super().write_batch(batch_)


def test_a_sink_failing_in_its_process_acknowledges_only_confirmed_batches(tmp_path):
    feed = tasks(30)
    out = tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match=r"positions 11..15: OSError: disk full"):
        Pipeline(feed, sink=own_process(FailingFileSink(out, 13)), batch_size=5,
                 batch_seconds=60).run()
    assert [c["new"]["id"] for c in lines(out)] == list(range(1, 11))
    assert feed.checkpoint.positions == {"tasks": 10}


def test_a_stage_failing_in_its_process_stops_the_pipeline(tmp_path):
    feed = tasks(30)
    out = tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match="stage explode failed on the change at position 7"):
        Pipeline(feed, [own_process(fail_on(7))], sink=JsonLinesSink(out), batch_size=5,
                 batch_seconds=60).run()
    assert [c["new"]["id"] for c in lines(out)] == list(range(1, 7))
    assert feed.checkpoint.positions == {"tasks": 6}


def test_a_stage_failing_in_the_feeds_process_with_the_sink_elsewhere(tmp_path):
    feed = tasks(30)
    out = tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match="position 4"):
        Pipeline(feed, [fail_on(4)], sink=own_process(JsonLinesSink(out))).run()
    assert [c["new"]["id"] for c in lines(out)] == [1, 2, 3]
    assert feed.checkpoint.positions == {"tasks": 3}


def test_dead_letters_from_other_processes(tmp_path):
    feed = tasks(10)
    out, dead = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    Pipeline(feed, [fail_on(2, 9), to_delta()], sink=JsonLinesSink(out),
             dead_letter=JsonLinesSink(dead), processes=True).run()
    assert [d["data"]["id"] for d in lines(out)] == [1, 3, 4, 5, 6, 7, 8, 10]
    assert [(r["change"]["position"], r["stage"]) for r in lines(dead)] == [
        (2, "explode"), (9, "explode")
    ]
    assert feed.checkpoint.positions == {"tasks": 10}


class KillingSink(JsonLinesSink):
    """Writes each batch, then SIGKILLs its own process once it has written ``kill_after`` rows."""

    def __init__(self, path, kill_after):
        super().__init__(path)
        self.kill_after = kill_after
        self.written = 0

    def write_batch(self, batch_):
        super().write_batch(batch_)
        self.written += len(batch_)
        if self.kill_after is not None and self.written >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def test_sink_process_killed_mid_stream_then_restart_loses_nothing(tmp_path):
    checkpoint = MemoryCheckpoint()
    out = tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match="died with exit code -9"):
        Pipeline(tasks(500, checkpoint=checkpoint),
                 sink=own_process(KillingSink(out, kill_after=130)),
                 batch_size=20, batch_seconds=60).run()
    acknowledged = checkpoint.load("tasks")
    first_run = [c["new"]["id"] for c in lines(out)]
    assert acknowledged is not None and acknowledged <= len(first_run) < 500
    assert first_run == list(range(1, len(first_run) + 1))  # all acknowledged rows were written

    Pipeline(tasks(500, checkpoint=checkpoint),
             sink=own_process(KillingSink(out, kill_after=None)),
             batch_size=20, batch_seconds=60).run()
    delivered = [c["new"]["id"] for c in lines(out)]
    assert set(delivered) == set(range(1, 501))  # nothing missing
    duplicates = {i for i in delivered if delivered.count(i) > 1}
    assert all(i > acknowledged for i in duplicates)  # only unacknowledged ones came twice
    assert checkpoint.load("tasks") == 500



def test_json_lines_sink_writes_each_batch_in_one_write():
    # One write(2) per batch: processes appending to one file never tear each other's lines.
    from changefeed.pipelines.sinks import Batch

    class RecordingFile:
        def __init__(self):
            self.writes = []

        def write(self, data):
            self.writes.append(bytes(data))
            return len(data)

        def flush(self):
            pass

    out = RecordingFile()
    JsonLinesSink(out).write_batch(Batch([{"id": 1}, {"id": 2}, {"id": 3}], [1, 2, 3]))
    assert out.writes == [b'{"id":1}\n{"id":2}\n{"id":3}\n']
