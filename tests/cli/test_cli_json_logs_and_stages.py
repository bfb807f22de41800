"""``changefeed run --log-format json`` and ``--stage MODULE:NAME``, as real processes against a
real PostgreSQL."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from clitools import assert_exit, json_lines, run_cli

pytestmark = pytest.mark.postgres

STAGES_DIR = str(Path(__file__).parents[1] / "serve")
WITH_STAGES = {"PYTHONPATH": os.pathsep.join([STAGES_DIR, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    pg.execute("INSERT INTO tasks SELECT g, 'task ' || g FROM generate_series(1, 6) g")
    return pg


def events(stderr: str, json_format: bool, slot: str) -> list[str]:
    """The events logged, with what differs between two runs (slot, LSNs, rates) masked."""
    if json_format:
        found = [json.loads(line)["event"] for line in stderr.splitlines()]
    else:
        found = [line.removeprefix("changefeed: ") for line in stderr.splitlines()]
    found = [re.sub(r"\b[0-9A-F]+/[0-9A-F]+\b", "LSN", e.replace(slot, "SLOT")) for e in found]
    return [re.sub(r"\(\d+/s on average\)", "(RATE)", e) for e in found]


def test_json_logs_say_the_same_events_as_the_text_logs_one_object_per_line(pg_dsn, tasks):
    base = ["run", "tasks", "--url", pg_dsn, "--prefeed", "snapshot", "--limit", "6"]
    text = run_cli(*base, "--slot", "text_logs")
    as_json = run_cli(*base, "--slot", "json_logs", "--log-format", "json")
    assert text.returncode == as_json.returncode == 0, (text.stderr, as_json.stderr)
    assert text.stdout == as_json.stdout
    lines = [json.loads(line) for line in as_json.stderr.splitlines()]
    assert lines and all(set(line) == {"time", "level", "pipeline", "event", "fields"}
                         for line in lines)
    assert all(line["pipeline"] is None and line["level"] == "info" for line in lines)
    json_events = events(as_json.stderr, True, "json_logs")
    assert events(text.stderr, False, "text_logs") == json_events
    assert "stopped after 6 changes (RATE)" in json_events


def test_json_logs_from_the_environment_and_errors_as_json_too(pg_dsn, tasks):
    result = run_cli("run", "nope", "--url", pg_dsn, env={"CHANGEFEED_LOG_FORMAT": "json"})
    assert result.returncode == 2
    (line,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert line["level"] == "error" and line["fields"]["exit_code"] == 2
    assert "table 'nope' does not exist" in line["event"]


def test_python_stages_run_in_order_after_the_filters(pg_dsn, tasks):
    result = run_cli("run", "tasks", "--url", pg_dsn, "--prefeed", "snapshot", "--limit", "6",
                     "--where", "id <= 4", "--stage", "example_stages:even_ids_only",
                     "--stage", "example_stages:Namespace.shout", "--stage", "example_stages:twice",
                     "--sink", "-", env=WITH_STAGES)
    assert result.returncode == 0, result.stderr
    assert [(d["data"]["id"], d["data"]["title"]) for d in json_lines(result.stdout)] == [
        (2, "TASK 2"), (2, "TASK 2"), (4, "TASK 4"), (4, "TASK 4")]


@pytest.mark.parametrize(
    "stage, fragment",
    [("example_stages", "use MODULE:NAME"),
     ("no_such_module_here:thing", "cannot import no_such_module_here"),
     ("example_stages:missing", "example_stages has no missing"),
     ("example_stages:NOT_CALLABLE", "is not callable")],
)
def test_a_bad_stage_is_one_line_before_anything_is_read(pg_dsn, tasks, stage, fragment):
    result = run_cli("run", "tasks", "--url", pg_dsn, "--stage", stage, env=WITH_STAGES)
    assert_exit(result, 2, fragment)
    assert tasks.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
