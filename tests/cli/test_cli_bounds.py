"""Numbers that mean nothing are refused in one line (exit 2) before anything connects, in every
command, in ``changefeed serve``'s config file and in sink URLs; and no input nests deep enough
to reach Python's recursion limit (a TOML file, a filter)."""

from __future__ import annotations

import pytest
from clitools import assert_exit, run_cli

from changefeed.errors import ConfigurationError
from changefeed.serve.pipelines.config import load_config
from changefeed.serve.pipelines.config_file import MAX_NESTING, too_deep

NOWHERE = "postgresql://127.0.0.1:1/nothing"
"""A URL nothing listens on: a refusal must come before any connection is tried."""


@pytest.mark.parametrize("args", [
    ["run", "t", "--until-idle", "nan"],
    ["run", "t", "--until-idle", "inf"],
    ["run", "t", "--until-idle", "-0"],
    ["run", "t", "--until-idle", "1e400"],
    ["run", "t", "--until-idle", "99999999999"],
    ["run", "t", "--chunk-size", "99999999999999999999"],
    ["run", "t", "--chunk-size", "0"],
    ["run", "t", "--limit", "99999999999999999999"],
    ["run", "t", "--limit", "-5"],
    ["run", "t", "--workers", "0"],
    ["run", "t", "--workers", "-2"],
    ["run", "t", "--workers", "65"],
    ["run", "t", "--workers", "1.5"],
    ["run", "t", "--workers", "many"],
    ["run", "t", "--workers", ""],
    ["slots", "--warn-retained", "-1"],
    ["slots", "--warn-retained", "nan"],
    ["slots", "--warn-retained", "infGB"],
    ["slots", "--warn-retained", "99999999999TB"],
    ["drain", "--slot", "s", "--timeout", "nan"],
    ["drain", "--slot", "s", "--timeout", "-1"],
    ["drain", "--slot", "s", "--timeout", "inf"],
    ["status", "--timeout", "nan"],
    ["status", "--timeout", "0"],
    ["demo", "--seconds", "nan"],
    ["demo", "--seconds", "-1"],
    ["demo", "--writer-seconds", "inf"],
    ["demo", "--port", "70000"],
    ["serve", "--port", "-1"],
], ids=lambda args: " ".join(args))
def test_numbers_that_mean_nothing_are_usage_errors(args):
    url = [] if args[0] in ("demo", "status", "serve") else ["--url", NOWHERE]
    result = run_cli(*args, *url, timeout=30)
    assert_exit(result, 2, args[-2])


@pytest.mark.parametrize("key, value, problem", [
    ("until_idle", "nan", "must be a finite number of seconds"),
    ("until_idle", "inf", "must be a finite number of seconds"),
    ("until_idle", "-0.0", "must be greater than 0"),
    ("restart_delay", "1e30", "at most 31536000 seconds"),
    ("stop_timeout", "-1", "must be greater than 0"),
    ("restart_max_delay", "nan", "must be a finite number"),
    ("chunk_size", "99999999999999999999", "must be from 1 to 9223372036854775807"),
    ("limit", "0", "must be from 1"),
])
def test_config_numbers_that_mean_nothing_are_refused_at_their_line(tmp_path, key, value,
                                                                     problem):
    config = tmp_path / "changefeed.toml"
    config.write_text(f'[pipelines.a]\nurl = "{NOWHERE}"\ntables = "t"\nsink = "-"\n'
                      f"{key} = {value}\n")
    with pytest.raises(ConfigurationError) as info:
        load_config(config)
    assert info.value.message.startswith(f"{config}:5: pipelines.a.{key}: must be")
    assert problem in info.value.message
    result = run_cli("serve", "--config", str(config), "--port", "0", timeout=30)
    assert_exit(result, 2, f"pipelines.a.{key}", problem)


@pytest.mark.parametrize("sink, problem", [
    ("redis://127.0.0.1:1/0?stream=s&maxlen=-1", "maxlen='-1': must be a whole number"),
    ("redis://127.0.0.1:1/0?stream=s&maxlen=99999999999999999999", "must be from 1"),
    ("kafka://127.0.0.1:1?timeout=nan", "timeout='nan': must be a finite number"),
    ("kafka://127.0.0.1:1?timeout=inf", "timeout='inf': must be a finite number"),
])
def test_sink_url_numbers_that_mean_nothing_are_refused(sink, problem):
    pytest.importorskip("redis" if sink.startswith("redis") else "confluent_kafka")
    result = run_cli("run", "t", "--url", NOWHERE, "--sink", sink, timeout=30)
    assert_exit(result, 2, problem)


DEEP = ["[" * 200 + "]" * 200, "[" * 5000 + "]" * 5000, "{a = " * 300 + "1" + "}" * 300,
        "[" * 100_000]


@pytest.mark.parametrize("value", DEEP, ids=["200", "5000", "inline-tables", "unclosed"])
def test_a_config_nested_too_deep_is_one_line_not_a_recursion_error(tmp_path, value):
    config = tmp_path / "changefeed.toml"
    config.write_text(f'[pipelines.a]\nurl = "{NOWHERE}"\ntables = "t"\nsink = "-"\n'
                      f"filter = {value}\n")
    with pytest.raises(ConfigurationError, match=f":5: arrays and inline tables nest more than"
                                                 f" {MAX_NESTING} levels deep"):
        load_config(config)
    result = run_cli("serve", "--config", str(config), "--port", "0", timeout=30)
    assert_exit(result, 2, "nest more than")


def test_nesting_is_counted_outside_strings_and_comments_only():
    brackets = "[" * (MAX_NESTING + 1)
    assert too_deep(f'a = "{brackets}"  # {brackets}\n') is None
    assert too_deep(f"a = '{brackets}'\nb = '''\n{brackets}\n'''\n") is None
    assert too_deep(f'a = """\n{brackets}\\"""\n"""\n') is None
    assert too_deep(f'a = "\\"{brackets}"\n') is None  # an escaped quote does not end it
    assert too_deep("a = 1\n" + f"b = {'[' * MAX_NESTING}{']' * MAX_NESTING}\n") is None
    assert too_deep("a = 1\n\nb = " + brackets) == 3
    assert too_deep(f'a = """\n\n"""\nb = {brackets}') == 4  # lines inside strings count


@pytest.mark.parametrize("filter_json", ['[[1]]', '[{"a": 1}]', '["and", [[1]]]', "[[]]"])
def test_a_filter_whose_operator_is_not_a_name_is_one_line(filter_json):
    result = run_cli("run", "t", "--url", NOWHERE, "--filter", filter_json, timeout=30)
    assert_exit(result, 2, "unknown filter operator")
