"""``--sink`` / ``--dead-letter`` values: the sink each form makes, and what a bad one says."""

from __future__ import annotations

import pytest

from changefeed import ConfigurationError
from changefeed.pipelines.sinks.http import SnorkySink, WebhookSink
from changefeed.pipelines.sinks.redis import RedisStreamSink
from changefeed.pipelines.sinks.spec import sink_from_spec


def test_sink_from_spec_for_each_form(monkeypatch, tmp_path):
    assert sink_from_spec("-").target == "-"
    assert sink_from_spec(str(tmp_path / "out.jsonl")).target == str(tmp_path / "out.jsonl")

    monkeypatch.setenv("CHANGEFEED_WEBHOOK_SECRET", "k")
    hook = sink_from_spec("https://example.com/hook?x=1")
    assert isinstance(hook, WebhookSink) and (hook.url, hook.secret) == (
        "https://example.com/hook?x=1", "k"
    )

    snorky = sink_from_spec("snorky+http://snorky:8001/backend?service=ds&key=sw", model="Task")
    assert isinstance(snorky, SnorkySink)
    assert (snorky.url, snorky.service, snorky.key, snorky.model) == (
        "http://snorky:8001/backend", "ds", "sw", "Task"
    )

    other = sink_from_spec("snorky+https://h/backend?key=k&region=eu")
    assert (other.url, other.service) == ("https://h/backend?region=eu", "datasync_backend")

    stream = sink_from_spec("redis://cache:6380/2?stream=changes&maxlen=1000")
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
def test_sink_from_spec_explains_bad_specs(spec, problem):
    with pytest.raises(ConfigurationError, match=problem):
        sink_from_spec(spec)


def test_a_snorky_sink_refuses_the_change_format():
    with pytest.raises(ConfigurationError, match="takes deltas"):
        sink_from_spec("snorky+http://h/backend?key=k", fmt="change")
