"""What ``changefeed run`` builds from --sink, --where, --filter, --format, --dead-letter."""

from __future__ import annotations

import json

import pytest

from changefeed import ConfigurationError
from changefeed.pipelines import JsonLinesSink, compile_filter
from changefeed.pipelines.cli import build_cli_pipeline, make_sink, parse_where
from changefeed.pipelines.redis_streams import RedisStreamSink
from changefeed.pipelines.sinks.http import SnorkySink, WebhookSink
from changefeed.testing import MemoryFeed, insert, update


def test_make_sink_for_each_form(monkeypatch, tmp_path):
    assert make_sink("-").target == "-"
    assert make_sink(str(tmp_path / "out.jsonl")).target == str(tmp_path / "out.jsonl")

    monkeypatch.setenv("CHANGEFEED_WEBHOOK_SECRET", "k")
    hook = make_sink("https://example.com/hook?x=1")
    assert isinstance(hook, WebhookSink) and (hook.url, hook.secret) == (
        "https://example.com/hook?x=1", "k"
    )

    snorky = make_sink("snorky+http://snorky:8001/backend?service=ds&key=sw", model="Task")
    assert isinstance(snorky, SnorkySink)
    assert (snorky.url, snorky.service, snorky.key, snorky.model) == (
        "http://snorky:8001/backend", "ds", "sw", "Task"
    )

    other = make_sink("snorky+https://h/backend?key=k&region=eu")
    assert (other.url, other.service) == ("https://h/backend?region=eu", "datasync_backend")

    stream = make_sink("redis://cache:6380/2?stream=changes&maxlen=1000")
    assert isinstance(stream, RedisStreamSink)
    assert (stream.url, stream.stream, stream.maxlen) == ("redis://cache:6380/2", "changes", 1000)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("snorky+http://h/backend?service=ds", "backend key"),
        ("redis://h:6379/0", "stream name"),
        ("ftp://h/x", "unsupported sink"),
    ],
)
def test_make_sink_explains_bad_specs(spec, problem):
    with pytest.raises(ConfigurationError, match=problem):
        make_sink(spec)


def test_a_snorky_sink_refuses_the_change_format():
    with pytest.raises(ConfigurationError, match="takes deltas"):
        make_sink("snorky+http://h/backend?key=k", fmt="change")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('status == "open"', ["==", "status", "open"]),
        ("status == 'open'", ["==", "status", "open"]),
        ("n >= 2 and n < 5", ["and", [">=", "n", 2], ["<", "n", 5]]),
        ("a == 1 or b == 2 and c == 3",
         ["or", ["==", "a", 1], ["and", ["==", "b", 2], ["==", "c", 3]]]),
        ("(a == 1 or b == 2) and c == 3",
         ["and", ["or", ["==", "a", 1], ["==", "b", 2]], ["==", "c", 3]]),
        ("not done == true", ["not", ["==", "done", True]]),
        ("owner.name != null", ["not", ["==", "owner.name", None]]),
        ("price <= -2.5e1", ["<=", "price", -25.0]),
        ('title == "say \\"hi\\""', ["==", "title", 'say "hi"']),
    ],
)
def test_parse_where(text, expected):
    assert parse_where(text) == expected
    compile_filter(expected)  # always a valid Snorky filter


@pytest.mark.parametrize(
    "text, column",
    [("status = 'open'", 8), ("== 1", 1), ("a == ", 5), ("a == b", 6), ("(a == 1", 8),
     ("a == 1 b == 2", 8), ("a == 'x", 6)],
)
def test_parse_where_points_at_the_problem(text, column):
    with pytest.raises(ConfigurationError, match=f"column {column}"):
        parse_where(text)


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
