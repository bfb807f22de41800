"""``changefeed drain``: the deploy gate, pure parts and against a real server."""

from __future__ import annotations

import json

import psycopg
import pytest
from clitools import assert_one_clear_line, run_cli, start_cli

from changefeed.backends.postgres.drain import (
    DrainState,
    describe,
    drain_target,
    timeout_message,
    without_page_header,
)
from changefeed.backends.postgres.protocol import parse_lsn

# -- pure ------------------------------------------------------------------------------------


def test_a_slot_is_drained_once_its_confirmed_position_reaches_the_target():
    target = parse_lsn("0/16B5000")
    assert DrainState("s", target, target, True).drained
    assert DrainState("s", target, target + 1, False).drained
    behind = DrainState("s", target, target - 2048, True)
    assert not behind.drained and behind.behind == 2048
    never = DrainState("s", target, None, False)
    assert not never.drained and never.behind == target


def test_descriptions_say_how_far_behind_and_whether_a_consumer_runs():
    target = parse_lsn("0/16B5000")
    assert describe(DrainState("s", target, target - 100, True)) == (
        "slot s is 100 bytes behind 0/16B5000 (confirmed 0/16B4F9C; its consumer is running)")
    assert describe(DrainState("s", target, target - 3 * 2**20, False)).startswith(
        "slot s is 3.0 MB behind")
    assert describe(DrainState("s", target, target, False)) == (
        "slot s is drained: confirmed 0/16B5000 has passed 0/16B5000")
    stopped = timeout_message(DrainState("s", target, target - 5, False, elapsed=3.2))
    assert stopped.startswith("not drained after 3 s: slot s is 5 bytes behind")
    assert stopped.endswith("start its consumer so that it can catch up")


# -- against a real server -------------------------------------------------------------------

pg_mark = pytest.mark.postgres


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id serial PRIMARY KEY, title text)")
    return pg


def write(conn, count, start=0):
    for n in range(start, start + count):
        conn.execute("INSERT INTO tasks (title) VALUES (%s)", [f"t{n}"])


def test_a_target_just_past_a_page_header_is_the_page_boundary():
    block, segment = 8192, 16 << 20
    assert without_page_header(5 * block + 24, block, segment) == 5 * block
    assert without_page_header(3 * segment + 40, block, segment) == 3 * segment
    for lsn in (5 * block, 5 * block + 32, 5 * block + 8000, 3 * segment + 48):
        assert without_page_header(lsn, block, segment) == lsn
    assert without_page_header(2 * 32768 + 24, 32768, 1 << 30) == 2 * 32768


@pg_mark
def test_the_target_covers_asynchronous_commits_not_written_yet(pg_dsn, tasks):
    # synchronous_commit = off: the commit returns before the WAL holding it is written, and
    # a gate reading only the write position opened with those changes undelivered (CI).
    tasks.execute("SET synchronous_commit = off")
    with psycopg.connect(pg_dsn, autocommit=True) as gate:
        for n in range(30):
            write(tasks, 1, n)
            (inserted,) = tasks.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert drain_target(gate) >= without_page_header(parse_lsn(inserted), 8192,
                                                             16 << 20)


@pg_mark
def test_an_unknown_slot_is_one_clear_line(pg_dsn, tasks):
    result = run_cli("drain", "--url", pg_dsn, "--slot", "nope", "--timeout", "1")
    assert_one_clear_line(result, "no replication slot named 'nope'")
    assert result.returncode == 2


@pg_mark
def test_a_physical_slot_is_refused(pg_dsn, tasks):
    tasks.execute("SELECT pg_create_physical_replication_slot('phys')")
    try:
        result = run_cli("drain", "--url", pg_dsn, "--slot", "phys", "--timeout", "1")
        assert_one_clear_line(result, "physical slot")
    finally:
        tasks.execute("SELECT pg_drop_replication_slot('phys')")


def test_a_bad_url_is_one_clear_line():
    result = run_cli("drain", "--url", "mongodb://localhost/x", "--slot", "s")
    assert_one_clear_line(result, "postgresql://")
    result = run_cli("drain", "--url", "postgresql://127.0.0.1:1/x", "--slot", "s",
                     "--timeout", "1")
    assert_one_clear_line(result, "cannot connect")


@pg_mark
def test_drain_times_out_while_the_consumer_is_stopped(pg_dsn, tasks):
    assert run_cli("run", "tasks", "--url", pg_dsn, "--until-idle", "0.5", "-q").returncode == 0
    write(tasks, 3)
    result = run_cli("drain", "--url", pg_dsn, "--slot", "changefeed_tasks", "--timeout", "2.5")
    assert_one_clear_line(result, "not drained after", "behind", "no consumer is running")
    assert result.returncode == 1
    assert "waiting: slot changefeed_tasks is" in result.stderr  # progress while waiting


@pg_mark
def test_drain_returns_once_a_running_consumer_delivered_everything(pg_dsn, tasks):
    assert run_cli("run", "tasks", "--url", pg_dsn, "--until-idle", "0.5", "-q").returncode == 0
    write(tasks, 500)  # written while nobody consumes
    consumer = start_cli("run", "tasks", "--url", pg_dsn, "-q")
    try:
        result = run_cli("drain", "--url", pg_dsn, "--slot", "changefeed_tasks",
                         "--timeout", "60")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("slot changefeed_tasks is drained")
        # Idle now, nothing new: the gate still opens (the feed confirms on keepalives).
        result = run_cli("drain", "--url", pg_dsn, "--slot", "changefeed_tasks",
                         "--timeout", "60")
        assert result.returncode == 0, result.stderr
    finally:
        _, out = consumer.stop(timeout=30)
    # Everything committed before the gate opened was delivered.
    titles = [json.loads(line)["data"]["title"] for line in out.splitlines()]
    assert titles == [f"t{n}" for n in range(500)]
