"""``--processes``: the stage and sink worker processes die with the feed's process.

The feed's process is killed with SIGKILL while its workers are busy in different ways (writing
a file, stuck in a webhook request, stuck in a stage); every worker must end within
`BOUND` seconds, and a new run then delivers everything that was committed.
"""

from __future__ import annotations

import json
import os
import signal

import psycopg
import pytest
from clitools import run_cli, start_cli
from proctools import descendants, ended, wait_ended
from stuck import STUCK_STAGE, Silent
from waiting import wait_until

pytestmark = pytest.mark.postgres

BOUND = 10.0
"""Seconds within which every worker must end after the feed's process was killed."""

@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    return pg


def insert(dsn: str, ids: range) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for i in ids:
            conn.execute("INSERT INTO tasks VALUES (%s, %s)", [i, f"task {i}"])


def kill_and_wait(run, expected_workers: int) -> list[int]:
    """SIGKILL the feed's process; every worker it started ends within `BOUND` seconds."""
    workers = descendants(run.pid)
    assert len(workers) >= expected_workers, workers
    os.kill(run.pid, signal.SIGKILL)
    run.process.wait(30)
    try:
        wait_ended(workers, BOUND, "the workers of a killed feed process")
    finally:
        for pid in workers:  # a failed test leaves nothing behind
            if not ended(pid):
                os.kill(pid, signal.SIGKILL)
    return workers


def test_file_sink_workers_die_with_the_feed_and_the_next_run_loses_nothing(
        pg_dsn, tasks, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["run", "tasks", "--url", pg_dsn, "--processes", "--where", "id > 0",
            "--sink", str(out)]
    with start_cli(*args) as run:
        run.wait_streaming()
        insert(pg_dsn, range(1, 201))
        wait_until(lambda: out.exists() and out.read_text().count("\n") >= 200,
                   "the rows in the sink file", 60)
        insert(pg_dsn, range(201, 401))  # some of these are in flight when it dies
        kill_and_wait(run, 1)  # the sink (--where and the format run in the feed's process)
    result = run_cli(*args, "--until-idle", "1.5")
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    ids = {json.loads(line)["data"]["id"] for line in lines}  # every line whole
    assert ids == set(range(1, 401))


def test_a_worker_stuck_in_a_webhook_request_dies_with_the_feed(pg_dsn, tasks):
    endpoint = Silent()
    try:
        with start_cli("run", "tasks", "--url", pg_dsn, "--processes",
                       "--sink", endpoint.url) as run:
            run.wait_streaming()
            insert(pg_dsn, range(1, 4))
            wait_until(endpoint.requested.is_set, "the webhook request", 60)
            kill_and_wait(run, 1)  # the sink, which writes the format
    finally:
        endpoint.close()


def test_a_worker_stuck_in_a_stage_dies_with_the_feed(pg_dsn, tasks, tmp_path):
    (tmp_path / "stuck_stage.py").write_text(STUCK_STAGE)
    mark = tmp_path / "stuck"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "STUCK_MARK": str(mark)}
    out = tmp_path / "out.jsonl"
    with start_cli("run", "tasks", "--url", pg_dsn, "--processes", "--stage",
                   "stuck_stage:stuck", "--sink", str(out), env=env) as run:
        run.wait_streaming()
        insert(pg_dsn, range(1, 4))
        wait_until(mark.exists, "the stage to be stuck", 60)
        kill_and_wait(run, 2)  # the stage; the sink, which writes the format
    assert not out.exists() or out.read_text() == ""


def test_every_copy_of_a_stage_s_process_dies_with_the_feed(pg_dsn, tasks, tmp_path):
    """``--workers 3``: the three copies of the stage's process (each started after the one
    before, which holds the parent's sentinel open) and the sink's all end."""
    (tmp_path / "stuck_stage.py").write_text(STUCK_STAGE)
    mark = tmp_path / "stuck"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "STUCK_MARK": str(mark)}
    out = tmp_path / "out.jsonl"
    with start_cli("run", "tasks", "--url", pg_dsn, "--workers", "3", "--stage",
                   "stuck_stage:stuck", "--sink", str(out), env=env) as run:
        run.wait_streaming()
        insert(pg_dsn, range(1, 4))
        wait_until(mark.exists, "the stage to be stuck", 60)
        kill_and_wait(run, 4)  # three copies of the stage; the sink
    assert not out.exists() or out.read_text() == ""
