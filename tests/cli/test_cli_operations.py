"""``changefeed run --sink`` against a real PostgreSQL and a real slow or failing webhook: the
server is never held, SIGTERM is quick and keeps what was confirmed, a slow sink keeps up."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from clitools import CliProcess, run_cli, start_cli
from testservers import Receiver, fast_stop_then_start

from changefeed.delivery import STOP_GRACE

pytestmark = pytest.mark.postgres

STOP_BOUND = STOP_GRACE + 27.0
"""SIGTERM must end a run within this many seconds: a third of the hang it catches (a webhook's
retries, 0.5 s doubling to 30 s, 8 attempts: 90 s once two failed), and several times what a
loaded machine takes to give its sink `STOP_GRACE` and exit."""


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    return pg


def delivered_ids(receiver: Receiver) -> list[int]:
    return [delta["data"]["id"] for _, body in receiver.accepted() for delta in json.loads(body)]


def stdout_ids(text: str) -> list[int]:
    return [json.loads(line)["data"]["id"] for line in text.splitlines()]


def start_streaming(dsn: str, *args: str) -> CliProcess:
    run = start_cli("run", "tasks", "--url", dsn, *args)
    run.wait_for_stderr("streaming public.tasks")
    return run


@pytest.mark.parametrize("extra", [[], ["--processes"]], ids=["in-process", "processes"])
def test_a_fast_restart_does_not_wait_for_a_run_whose_webhook_fails(
    pg_dsn, pg_server, tasks, extra
):
    receiver = Receiver(fail_first=10**9).start()  # 503 forever
    try:
        with start_streaming(pg_dsn, "--sink", receiver.url, *extra) as run:
            tasks.execute("INSERT INTO tasks SELECT i, 'x' FROM generate_series(1, 20) i")
            run.wait_for(lambda: len(receiver.requests) >= 2, "two failed deliveries")
            # Before, the walsender waited for the feed's answer until wal_sender_timeout (60 s;
            # pg_ctl gives up at 60 s too). What is timed is that wait, so the shutdown
            # checkpoint (the dirty pages of every earlier test on this server, slow on a loaded
            # disk) is written before; half the timeout still tells a hang from a slow stop.
            hang = tasks.execute("SELECT setting::int FROM pg_settings"
                                 " WHERE name = 'wal_sender_timeout'").fetchone()[0] / 1000
            tasks.execute("CHECKPOINT")
            took = fast_stop_then_start(pg_server)
            assert took < hang / 2, f"pg_ctl -m fast stop waited {took:.1f} s for the feed"
            run.stop(timeout=STOP_BOUND)
    finally:
        receiver.stop()
    assert run.process.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    # Nothing was confirmed, so nothing was acknowledged: every row comes again.
    result = run_cli("run", "tasks", "--url", pg_dsn, "--until-idle", "2", "-q")
    assert stdout_ids(result.stdout) == list(range(1, 21)), result.stderr


@pytest.mark.parametrize("extra", [[], ["--processes"]], ids=["in-process", "processes"])
def test_sigterm_ends_a_run_whose_webhook_retries_and_acknowledges_what_was_confirmed(
    pg_dsn, tasks, extra
):
    receiver = Receiver().start()
    try:
        with start_streaming(pg_dsn, "--sink", receiver.url, *extra) as run:
            tasks.execute("INSERT INTO tasks SELECT i, 'x' FROM generate_series(1, 3) i")
            run.wait_for(lambda: delivered_ids(receiver) == [1, 2, 3], "the first rows")
            receiver.fail_first = 10**9  # from now on: 503 forever (8 retries: over a minute)
            tasks.execute("INSERT INTO tasks SELECT i, 'x' FROM generate_series(4, 6) i")
            run.wait_for(lambda: len(receiver.requests) >= 3, "two failed deliveries")
            began = time.monotonic()
            run.stop(timeout=STOP_BOUND)
            took = time.monotonic() - began
    finally:
        receiver.stop()
    assert run.process.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert took < STOP_BOUND
    # 1..3 were confirmed and acknowledged; 4..6 were not and come again, once.
    result = run_cli("run", "tasks", "--url", pg_dsn, "--until-idle", "2", "-q")
    assert stdout_ids(result.stdout) == [4, 5, 6], result.stderr


def test_a_slow_webhook_keeps_up_with_a_steady_writer(pg_dsn, tasks):
    # Each answer takes 1 s. Writing 500 rows/s for 5 s, batches must grow toward the backlog
    # (before, they stayed under 100 changes and the lag grew without end).
    receiver = Receiver(delay=1.0).start()
    total = 2500
    try:
        with start_streaming(pg_dsn, "--sink", receiver.url) as run, \
                psycopg.connect(pg_dsn, autocommit=True) as conn:
            next_id = 1
            period = 0.1
            began = time.monotonic()
            while next_id <= total:
                conn.execute("INSERT INTO tasks SELECT i, 'x'"
                             " FROM generate_series(%s::int, %s::int) i", [next_id, next_id + 49])
                next_id += 50
                # the writer's pace (500 rows/s), not a wait for a condition
                time.sleep(max(0.0, began + period * (next_id // 50) - time.monotonic()))
            answered_while_writing = len(receiver.requests)
            run.wait_for(lambda: len(delivered_ids(receiver)) >= total, "every row delivered",
                         60)
            run.stop(timeout=STOP_BOUND)
    finally:
        receiver.stop()
    assert delivered_ids(receiver) == list(range(1, total + 1))  # in order, nothing twice
    sizes = [len(json.loads(body)) for _, body in receiver.accepted()]
    assert max(sizes) >= 250, sizes  # ~ what one second of writing brings
    # The lag, counted in answers (each takes 1 s) rather than in seconds a loaded machine
    # stretches: the backlog left when the writer ended came in a few batches (the one in
    # flight, then what grew meanwhile); at 80 per batch it would take ~25 more answers.
    after = len(receiver.requests) - answered_while_writing
    assert after <= 6, f"{after} answers after the writer ended; batches {sizes}"
    # Everything delivered was acknowledged: a new run has nothing to repeat.
    result = run_cli("run", "tasks", "--url", pg_dsn, "--until-idle", "2", "-q")
    assert result.stdout == "", result.stderr
