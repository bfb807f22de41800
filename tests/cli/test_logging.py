"""Logs for people and for collectors: the text and JSON formats, and secrets kept out of both."""

from __future__ import annotations

import json
import logging
import re

import pytest

from changefeed.cli.common import JsonLogFormatter, TextLogFormatter, _PipelineLabel
from changefeed.redact import redact, register_secret


def record(message: str, *args: object, pipeline: str | None = None, fields=None,
           level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    made = logging.LogRecord("changefeed.x", level, __file__, 1, message, args, exc_info)
    if pipeline is not None:
        made.pipeline = pipeline
    if fields is not None:
        made.fields = fields
    return made


def test_text_lines_name_the_pipeline_when_there_is_one():
    formatter = TextLogFormatter()
    assert formatter.format(record("%s changes", 5)) == "changefeed: 5 changes"
    assert formatter.format(record("%s changes", 5, pipeline="orders")) == (
        "changefeed: [orders] 5 changes")


@pytest.mark.parametrize("level, name", [(logging.INFO, "info"), (logging.WARNING, "warning"),
                                         (logging.ERROR, "error")])
def test_json_lines_carry_time_level_pipeline_event_and_fields(level, name):
    line = JsonLogFormatter().format(record("streaming %s", "public.orders", level=level,
                                            pipeline="orders", fields={"state": "streaming"}))
    assert "\n" not in line
    parsed = json.loads(line)
    assert set(parsed) == {"time", "level", "pipeline", "event", "fields"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["time"])
    assert parsed["level"] == name
    assert parsed["pipeline"] == "orders"
    assert parsed["event"] == "streaming public.orders"
    assert parsed["fields"] == {"logger": "changefeed.x", "state": "streaming"}


def test_json_lines_outside_a_pipeline_and_with_a_traceback():
    try:
        raise RuntimeError("boom at https://u:pw@example.com/x")
    except RuntimeError:
        import sys

        made = record("failed", level=logging.ERROR, exc_info=sys.exc_info())
    parsed = json.loads(JsonLogFormatter().format(made))
    assert parsed["pipeline"] is None
    assert "RuntimeError: boom" in parsed["fields"]["error"]
    assert "pw@" not in parsed["fields"]["error"] and "https://***@example.com/x" in (
        parsed["fields"]["error"])


@pytest.mark.parametrize("secret", ['quo"te\\back', "t0k3n-val", "ünïcødé-sëcret"])
def test_registered_secrets_are_masked_in_both_formats_wherever_they_appear(secret):
    register_secret(secret)
    message = f"the receiver said: token {secret} refused"
    made = record("%s", message, fields={"detail": [secret, {"deep": secret}]})
    text = TextLogFormatter().format(made)
    line = JsonLogFormatter().format(made)
    assert secret not in text and "token *** refused" in text
    assert secret not in json.loads(line)["event"] and secret not in line
    assert json.loads(line)["fields"]["detail"] == ["***", {"deep": "***"}]
    assert redact(f"x{secret}y") == "x***y"


def test_short_values_are_not_registered_as_secrets():
    register_secret("ab1")
    assert redact("ab1 stays") == "ab1 stays"


def test_the_pipeline_label_keeps_a_label_given_by_the_record():
    label = _PipelineLabel("orders")
    own, other = record("a"), record("b", pipeline="lines")
    assert label.filter(own) and label.filter(other)
    assert own.pipeline == "orders" and other.pipeline == "lines"
