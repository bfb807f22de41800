"""What ``changefeed run`` builds from --where, --filter, --format, --dead-letter and --sink."""

from __future__ import annotations

import json
import os

import pytest

from changefeed import ConfigurationError
from changefeed.cli.pipeline_options import build_cli_pipeline
from changefeed.pipelines import JsonLinesSink
from changefeed.testing import MemoryFeed, insert, update


def test_build_cli_pipeline_where_filter_and_format(tmp_path):
    out = tmp_path / "out.jsonl"
    feed = MemoryFeed("public.tasks", changes=[
        insert("public.tasks", {"id": 1, "owner": "ann", "color": "blue"}),
        insert("public.tasks", {"id": 2, "owner": "bob", "color": "blue"}),
        update("public.tasks", {"id": 1, "owner": "ann", "color": "red"},
               {"id": 1, "owner": "ann", "color": "blue"}, key={"id": 1}),
    ])
    pipeline = build_cli_pipeline(feed, where="owner == 'ann'", filter='["==", "color", "blue"]',
                                  sink=str(out), model="Task")
    assert pipeline.run() == 3
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"type": "insert", "model": "Task", "data": {"id": 1, "owner": "ann", "color": "blue"}},
        {"type": "delete", "model": "Task", "data": {"id": 1, "owner": "ann", "color": "blue"}},
    ]
    assert feed.checkpoint.positions == {"public.tasks": 3}


def test_build_cli_pipeline_change_format_to_stdout_with_dead_letters(tmp_path, capsysbinary):
    dead = tmp_path / "dead.jsonl"
    feed = MemoryFeed("tasks", changes=[
        insert("tasks", {"id": 1}),
        update("tasks", {"id": 1, "c": 1}, {"id": 1}, key={"id": 1}),
    ])
    # The update's old row lacks "c": the subscription cannot decide, so it is dead-lettered.
    pipeline = build_cli_pipeline(feed, filter='[">=", "c", 0]', sink="-", fmt="change",
                                  dead_letter=str(dead))
    assert isinstance(pipeline.sink, JsonLinesSink)
    pipeline.run()
    assert capsysbinary.readouterr().out == b""  # the insert has no "c": not for this filter
    [record] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert "REPLICA IDENTITY FULL" in record["error"] and record["change"]["position"] == 2
    assert feed.checkpoint.positions == {"tasks": 2}


def test_build_cli_pipeline_rejects_bad_options():
    feed = MemoryFeed("tasks")
    with pytest.raises(ConfigurationError, match="not JSON"):
        build_cli_pipeline(feed, filter="color == blue")
    with pytest.raises(ConfigurationError, match="unknown filter operator"):
        build_cli_pipeline(feed, filter='["~", "color", "blue"]')
    with pytest.raises(ConfigurationError, match="dead letters"):
        build_cli_pipeline(feed, dead_letter="redis://h/0?stream=x")


@pytest.mark.parametrize(("options", "groups"), [
    # --where stays in the feed's process (compiled, cheaper than a crossing); the format
    # joins the last stage's process: only lines cross to the sink's.
    ({"where": "id >= 0"}, [["RowWhere", "EncodeLines"], []]),
    # Each other stage has a process of its own.
    ({"where": "id >= 0", "filter": '["==", "c", 1]'},
     [["RowWhere"], ["Subscription", "EncodeLines"], []]),
    ({"filter": '["==", "c", 1]'}, [[], ["Subscription", "EncodeLines"], []]),
    # The change format is the sink's own way of writing a change: no stage to place.
    ({"where": "id >= 0", "filter": '["==", "c", 1]', "fmt": "change"},
     [["RowWhere"], ["Subscription"], []]),
    # Without stages the feed's process writes the lines.
    ({"fmt": "debezium"}, [["EncodeLines"], []]),
])
def test_with_processes_lines_cross_to_the_sink_s_process(tmp_path, options, groups):
    out = tmp_path / "out.jsonl"
    options = {**options, "sink": str(out)}
    changes = [insert("public.t", {"id": n, "c": 1}) for n in range(1, 4)]
    pipeline = build_cli_pipeline(MemoryFeed("public.t", changes=changes), processes=True,
                                  **options)
    names = [[type(stage).__name__ for stage in group] for group in pipeline._groups]
    assert names == groups  # group 0 is the feed's process; the sink runs in the last
    assert pipeline.run() == 3  # the sink's process writes every change
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(("options", "groups", "workers"), [
    # Each stage's process runs in copies, the format with the last; the sink alone.
    ({"filter": '["==", "c", 1]'}, [[], ["Subscription", "EncodeLines"], []], [1, 3, 1]),
    ({"where": "id >= 0", "filter": '["==", "c", 1]'},
     [["RowWhere"], ["Subscription", "EncodeLines"], []], [1, 3, 1]),
    # No stage to copy: as --processes.
    ({"where": "id >= 0"}, [["RowWhere", "EncodeLines"], []], [1, 1]),
    # A sink that does not take lines formats in its own process, alone.
    ({"filter": '["==", "c", 1]', "sink": "http://127.0.0.1:1/hook"},
     [[], ["Subscription"], ["ToDelta"]], [1, 3, 1]),
    ({"filter": '["==", "c", 1]', "sink": "redis://127.0.0.1:1/0?stream=s"},
     [[], ["Subscription"], []], [1, 3, 1]),
])
def test_workers_copy_each_stage_s_process(tmp_path, options, groups, workers):
    options = {"sink": str(tmp_path / "out.jsonl"), **options}
    changes = [insert("public.t", {"id": n, "c": 1}) for n in range(1, 4)]
    pipeline = build_cli_pipeline(MemoryFeed("public.t", changes=changes), workers=3, **options)
    assert [[type(stage).__name__ for stage in group] for group in pipeline._groups] == groups
    assert pipeline._workers == workers


def test_workers_auto_is_the_cores_this_process_may_use():
    from changefeed.cli.pipeline_options import MAX_WORKERS, workers_count

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert workers_count("auto") == workers_count(" AUTO ") == min(cores, MAX_WORKERS)
    assert workers_count("4") == workers_count(4) == 4
    for bad in ("0", "-1", str(MAX_WORKERS + 1), "1e3", "x", "", 0, True, 2.0):
        with pytest.raises(ConfigurationError, match="whole number from 1 to"):
            workers_count(bad)
