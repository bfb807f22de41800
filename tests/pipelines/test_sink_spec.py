"""``--sink`` / ``--dead-letter`` values: the sink each form makes, and what a bad one says."""

from __future__ import annotations

import sys

import pytest

from changefeed import ConfigurationError
from changefeed.pipelines.sinks import CallbackSink, Sink
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


def test_an_unsupported_sink_lists_every_kind():
    with pytest.raises(ConfigurationError) as info:
        sink_from_spec("ftp://user:secret@h/x")
    assert info.value.message == (
        "unsupported sink 'ftp://***@h/x': use -, a file path, http(s)://, snorky+http(s)://,"
        " redis:// or kafka://"
    )


def test_a_missing_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # what an absent package does
    with pytest.raises(ConfigurationError, match=r"a Kafka sink needs confluent-kafka \(.*\):"
                                                 r" pip install 'changefeed\[kafka\]'"):
        sink_from_spec("kafka://127.0.0.1:9092?topic=t")


def test_a_kafka_spec_sets_the_topic_security_and_bound():
    sink = sink_from_spec("kafkas://b1:9093,b2:9093?topic=cdc.{table}&timeout=2.5"
                          "&compression.type=zstd", fmt="debezium")
    assert (sink.bootstrap, sink.topic, sink.timeout) == ("b1:9093,b2:9093", "cdc.{table}", 2.5)
    assert sink.config == {"compression.type": "zstd", "security.protocol": "SSL"}
    for timeout in ("soon", "nan", "inf", "-1", "0", "1e12"):
        with pytest.raises(ConfigurationError, match=f"timeout='{timeout}': must be"):
            sink_from_spec(f"kafka://b1:9092?timeout={timeout}")


@pytest.mark.parametrize("maxlen", ["-1", "0", "1.5", "nan", "99999999999999999999", "x"])
def test_a_redis_maxlen_that_means_nothing_is_refused(maxlen):
    with pytest.raises(ConfigurationError, match=f"maxlen='{maxlen}': must be"):
        sink_from_spec(f"redis://h:6379/0?stream=s&maxlen={maxlen}")


def test_every_sink_declares_the_contract(tmp_path):
    sinks = [sink_from_spec(spec) for spec in (
        "-", str(tmp_path / "out.jsonl"), "https://h/hook", "snorky+http://h/backend?key=k",
        "redis://h/0?stream=s", "kafka://h:9092",
    )] + [CallbackSink(print)]
    assert all(isinstance(sink, Sink) for sink in sinks)
    assert [sink.accepts for sink in sinks] == [
        "any", "any", "any", "deltas", "changes", "changes", "any"]
    assert [sink.local for sink in sinks] == [False, True, False, False, False, False, False]
    for sink in sinks:
        sink.interrupt()  # safe on any sink, delivering or not
        sink.close()
