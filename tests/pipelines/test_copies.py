"""Copies of a stage's process (``own_process(stage, workers=N)``): chunks finish in any order,
the next single process puts them back in the feed's (`InOrder`), failures keep their place.

These use the in-memory feed; ``test_worker_copies.py`` runs ``changefeed run --workers`` on a
real server."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest
from waiting import wait_until

from changefeed import ConfigurationError, PipelineError
from changefeed.pipelines import JsonLinesSink, Pipeline, own_process, to_delta
from changefeed.pipelines._crossing import InOrder, _Chunk
from changefeed.testing import MemoryFeed, insert


def tasks(n: int) -> MemoryFeed:
    return MemoryFeed("tasks", changes=[insert("tasks", {"id": i, "cost": (i % 20 == 1) * 30})
                                        for i in range(1, n + 1)])


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Costly:
    """Sleeps ``cost`` ms (the first change of each chunk of 20 is slow), notes its process
    and the change in ``log`` when done, fails on ``fail``. ``hold_first``: the first change
    waits until another copy noted a later one (a condition, not a head start that a loaded
    machine may not honour), so chunks surely finish out of the feed's order.

    ``fail_together``: a failing change first notes its process in ``<log>.failed`` and waits
    until that many processes did (each copy then fails on a chunk of its own).
    ``hold_first_for``: (a ``.failed`` file, n): the first change waits until n processes
    noted a failure there."""

    def __init__(self, log, fail=(), hold_first=False, fail_together=0, hold_first_for=None):
        self.log = str(log)
        self.fail = fail
        self.hold_first = hold_first
        self.fail_together = fail_together
        self.hold_first_for = hold_first_for
        self.name = "costly"

    @property
    def failures(self) -> str:
        return self.log + ".failed"

    def __call__(self, change):
        time.sleep(change.new["cost"] / 1000)
        if self.hold_first and change.new["id"] == 1:
            wait_until(lambda: os.path.exists(self.log) and os.path.getsize(self.log),
                       "another copy to finish a later change", 60, step=0.01)
        if self.hold_first_for and change.new["id"] == 1:
            path, count = self.hold_first_for
            wait_until(lambda: failed_processes(path) >= count,
                       f"{count} copies after this one to fail", 60, step=0.01)
        if change.new["id"] in self.fail:
            if self.fail_together:
                with open(self.failures, "a") as file:
                    file.write(f"{os.getpid()}\n")
                wait_until(lambda: failed_processes(self.failures) >= self.fail_together,
                           f"{self.fail_together} copies to fail", 60, step=0.01)
            raise ValueError(f"bad row {change.new['id']}")
        with open(self.log, "a") as file:
            file.write(f"{os.getpid()} {change.new['id']}\n")
        return change


class InOrderOnly:
    """A stage with state across changes: it fails on a change that comes out of order."""

    name = "in_order_only"

    def __init__(self):
        self.last = 0

    def __call__(self, change):
        if change.position <= self.last:
            raise AssertionError(f"position {change.position} after {self.last}")
        self.last = change.position
        return change


def failed_processes(path) -> int:
    """How many processes noted a failure in ``path`` (a `Costly` ``.failed`` file)."""
    return len(set(open(path).read().split())) if os.path.exists(path) else 0


def finished(log) -> tuple[set[int], list[int]]:
    pids, ids = set(), []
    for line in log.read_text().splitlines():
        pid, number = line.split()
        pids.add(int(pid))
        ids.append(int(number))
    return pids, ids


def test_in_order_gives_chunks_back_in_their_sequence():
    rng = random.Random(7)
    seqs = list(range(200))
    rng.shuffle(seqs)
    order, most_waiting = InOrder(), 0
    out = []
    for seq in seqs:
        out += [chunk.seq for chunk in order.add(_Chunk([], False, seq))]
        most_waiting = max(most_waiting, len(order))
    assert out == list(range(200)) and len(order) == 0
    assert 0 < most_waiting < 200


@pytest.mark.parametrize("copies", [2, 3])
def test_copies_deliver_in_the_feed_s_order_to_a_single_process_and_the_sink(tmp_path, copies):
    """A copied stage, a stage that needs the feed's order in a process of its own, another
    copied stage, then the sink (in a process of its own): every change once, in order,
    acknowledged."""
    feed, out, log = tasks(400), tmp_path / "out.jsonl", tmp_path / "log"
    pipeline = Pipeline(feed, [own_process(Costly(log, hold_first=True), workers=copies),
                               own_process(InOrderOnly()), own_process(to_delta(), workers=2)],
                        sink=JsonLinesSink(out), batch_size=20, batch_seconds=60)
    assert pipeline._workers == [1, copies, 1, 2, 1]
    assert pipeline.run() == 400
    pids, ids = finished(log)
    assert len(pids) >= 2 and ids != sorted(ids)  # shared, and finished out of order
    assert [d["data"]["id"] for d in lines(out)] == list(range(1, 401))
    assert feed.checkpoint.positions == {"tasks": 400}


def test_the_sink_gets_a_process_of_its_own_after_copies(tmp_path):
    out, log = tmp_path / "out.jsonl", tmp_path / "log"
    pipeline = Pipeline(tasks(100), [own_process(Costly(log), workers=2), to_delta()],
                        sink=JsonLinesSink(out), batch_size=20, batch_seconds=60)
    assert [len(group) for group in pipeline._groups] == [0, 2, 0]
    assert pipeline._workers == [1, 2, 1]
    assert pipeline.run() == 100
    assert [d["data"]["id"] for d in lines(out)] == list(range(1, 101))


def test_processes_with_workers_copies_each_stage_but_not_the_sink(tmp_path):
    out = tmp_path / "out.jsonl"
    pipeline = Pipeline(tasks(60), [Costly(tmp_path / "log"), to_delta()],
                        sink=JsonLinesSink(out), workers=3, batch_size=20, batch_seconds=60)
    assert pipeline._workers == [1, 3, 3, 1]
    assert pipeline.run() == 60
    assert [d["data"]["id"] for d in lines(out)] == list(range(1, 61))


@pytest.mark.parametrize("fail", [(47,), (47, 48, 90)])
def test_a_copy_s_failure_is_raised_after_what_came_before_it(tmp_path, fail):
    """Row 47 (the third chunk) fails in one copy while another still works on earlier chunks;
    later chunks done meanwhile are not written."""
    feed, out = tasks(200), tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match="stage costly failed on the change at position 47"):
        Pipeline(feed, [own_process(Costly(tmp_path / "log", fail), workers=3)],
                 sink=JsonLinesSink(out), batch_size=20, batch_seconds=60).run()
    assert [c["new"]["id"] for c in lines(out)] == list(range(1, 47))
    assert feed.checkpoint.positions == {"tasks": 46}


def test_a_failure_in_the_feed_s_process_waits_for_the_copies(tmp_path):
    def explode(change):
        if change.new["id"] == 55:
            raise ValueError("bad row 55")
        return change

    feed, out = tasks(200), tmp_path / "out.jsonl"
    with pytest.raises(PipelineError, match="position 55"):
        Pipeline(feed, [explode, own_process(Costly(tmp_path / "log"), workers=2)],
                 sink=JsonLinesSink(out), batch_size=20, batch_seconds=60).run()
    assert [c["new"]["id"] for c in lines(out)] == list(range(1, 55))
    assert feed.checkpoint.positions == {"tasks": 54}


def test_dead_letters_from_copies_keep_the_feed_s_order(tmp_path):
    feed = tasks(120)
    out, dead = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    Pipeline(feed, [own_process(Costly(tmp_path / "log", fail=(2, 41, 42, 99)), workers=3)],
             sink=JsonLinesSink(out), dead_letter=JsonLinesSink(dead), batch_size=20,
             batch_seconds=60).run()
    assert [c["new"]["id"] for c in lines(out)] == [
        i for i in range(1, 121) if i not in (2, 41, 42, 99)]
    assert [(r["change"]["position"], r["stage"]) for r in lines(dead)] == [
        (2, "costly"), (41, "costly"), (42, "costly"), (99, "costly")]
    assert feed.checkpoint.positions == {"tasks": 120}


@pytest.mark.parametrize("make", [
    lambda: own_process(to_delta(), workers=0),
    lambda: own_process(to_delta(), workers=True),
    lambda: own_process(to_delta(), workers=1.5),
    lambda: Pipeline(tasks(1), [to_delta()], sink=JsonLinesSink("/dev/null"), workers=-1),
    lambda: Pipeline(tasks(1), [to_delta()], sink=own_process(JsonLinesSink("/dev/null"),
                                                               workers=2)),
], ids=["zero", "bool", "float", "pipeline negative", "sink copies"])
def test_bad_worker_counts_are_configuration_errors(make):
    with pytest.raises(ConfigurationError, match="workers"):
        make()


def test_a_failure_in_copies_after_copies_waits_for_the_chunks_before_it(tmp_path):
    """The second copied stage gets chunks in any order: a copy that failed on a later chunk
    still passes on the earlier ones it takes next, so the failure is raised after them (a
    copy that stopped at its failure would hold them back for ever)."""
    # The first chunk waits in the first stage until every copy of the second has failed on
    # a later one (each on its own: a failing copy waits for the others), then comes to one
    # of them. Conditions, not a head start a loaded machine may not honour.
    feed = MemoryFeed("tasks", changes=[insert("tasks", {"id": i, "cost": 0})
                                        for i in range(1, 301)])
    out = tmp_path / "out.jsonl"
    second = Costly(tmp_path / "log2", fail=range(21, 301), fail_together=3)
    first = Costly(tmp_path / "log", hold_first_for=(second.failures, 3))
    pipeline = Pipeline(feed, [own_process(first, workers=3), own_process(second, workers=3)],
                        sink=JsonLinesSink(out), batch_size=20, batch_seconds=60)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run()
        except BaseException as exc:  # noqa: BLE001  (looked at below)
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if thread.is_alive():  # a chunk held back: no failure ever comes
        pipeline.stop()
        thread.join(60)
        pytest.fail("the pipeline waited for ever for a chunk a failed copy dropped")
    [error] = raised
    assert isinstance(error, PipelineError) and "position 21" in str(error), error
    assert [c["new"]["id"] for c in lines(out)] == list(range(1, 21))
    assert feed.checkpoint.positions == {"tasks": 20}
