"""``changefeed run`` with pipeline options, as a real process on a real PostgreSQL, delivering
to a real HTTP server, Redis, Snorky, files and worker processes."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import threading
import time

import httpx
import psycopg
import pytest
from clitools import assert_one_clear_line, run_cli, start_cli
from proctools import children
from testservers import SNORKY_KEY
from websockets.sync.client import connect

from changefeed.backends.redis_streams import RedisStreamFeed
from changefeed.pipelines import Pipeline
from changefeed.testing import ListSink

pytestmark = pytest.mark.postgres

@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, color text, title text)")
    return pg


def insert_rows(dsn: str, ids: range, color: str = "blue") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in ids:
            conn.execute("INSERT INTO tasks VALUES (%s, %s, %s)", [i, color, f"task {i}"])


def create_slot(dsn: str, *extra: str) -> None:
    """A first run creates the slot (and publication), so later writes are all captured."""
    result = run_cli("run", "tasks", "--url", dsn, "--until-idle", "0.3", "--quiet", *extra)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("receiver", [(3,)], indirect=True)
def test_webhook_fails_then_recovers_nothing_lost_retries_keep_their_key(pg_dsn, tasks, receiver):
    secret = "hush"
    create_slot(pg_dsn, "--sink", receiver.url)
    insert_rows(pg_dsn, range(1, 41))
    result = run_cli("run", "tasks", "--url", pg_dsn, "--sink", receiver.url, "--model", "Task",
                     "--until-idle", "1.5", env={"CHANGEFEED_WEBHOOK_SECRET": secret})
    assert result.returncode == 0, result.stderr
    assert "retrying" in result.stderr  # the 503s were noticed and retried

    statuses = [status for _, _, status in receiver.requests]
    assert statuses[:4] == [503, 503, 503, 200]
    # The retries of one batch are the same request: same key, same body.
    assert len({h["idempotency-key"] for h, _, _ in receiver.requests[:4]}) == 1
    assert len({body for _, body, _ in receiver.requests[:4]}) == 1
    delivered = [d["data"]["id"] for _, body in receiver.accepted() for d in json.loads(body)]
    assert sorted(delivered) == list(range(1, 41))
    for headers, body in receiver.accepted():
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-changefeed-signature"] == expected
    assert {d["model"] for _, body in receiver.accepted() for d in json.loads(body)} == {"Task"}

    # Everything was acknowledged: a new run delivers only what is new.
    receiver.requests.clear()
    insert_rows(pg_dsn, range(41, 43))
    assert run_cli("run", "tasks", "--url", pg_dsn, "--sink", receiver.url,
                   "--until-idle", "1", "--quiet").returncode == 0
    again = [d["data"]["id"] for _, body in receiver.accepted() for d in json.loads(body)]
    assert again == [41, 42]


def test_redis_stream_sink_read_back_through_a_consumer_group(pg_dsn, tasks, redis_url):
    sink = f"{redis_url}?stream=cli-tasks"
    create_slot(pg_dsn, "--sink", sink)
    insert_rows(pg_dsn, range(1, 31))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE tasks SET color = 'red' WHERE id = 1")
        conn.execute("DELETE FROM tasks WHERE id = 2")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--sink", sink, "--until-idle", "1")
    assert result.returncode == 0, result.stderr

    worker = RedisStreamFeed(redis_url, "cli-tasks", "readers", "worker-1")
    out = ListSink()
    assert Pipeline(worker, [], sink=out).run(idle_timeout=1.0, timeout=30) == 32
    assert [(c.operation.name, c.key) for c in out.items[-2:]] == [
        ("UPDATE", {"id": 1}), ("DELETE", {"id": 2})
    ]
    assert [c.new["id"] for c in out.items[:30]] == list(range(1, 31))
    assert out.items[0].table == "public.tasks"
    sources = [c.meta["source_position"] for c in out.items]
    assert sources == sorted(sources)  # PostgreSQL positions, in commit order
    # The group acknowledged all of them: another worker finds nothing pending.
    other = ListSink()
    Pipeline(RedisStreamFeed(redis_url, "cli-tasks", "readers", "worker-2", claim_idle=0.01),
             [], sink=other).run(idle_timeout=0.5, timeout=30)
    assert other.items == []


def test_snorky_subscriber_receives_deltas_from_postgresql(pg_dsn, tasks, snorky):
    sink = f"snorky+{snorky}/backend?service=datasync_backend&key={SNORKY_KEY}"
    create_slot(pg_dsn, "--sink", sink, "--model", "Task")
    answer = httpx.post(f"{snorky}/backend", headers={"X-Backend-Key": SNORKY_KEY}, json={
        "service": "datasync_backend",
        "message": {"command": "authorizeSubscription", "callId": 1,
                    "params": {"items": [{"dealer": "AllTasks", "query": None}]}},
    }).json()
    with connect(snorky.replace("http", "ws") + "/ws") as ws:
        ws.send(json.dumps({"service": "datasync", "message": {
            "command": "acquireSubscription", "params": {"token": answer["message"]["data"]},
            "callId": 1}}))
        assert json.loads(ws.recv(timeout=5))["message"]["type"] == "response"
        insert_rows(pg_dsn, range(1, 3))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE tasks SET title = 'renamed' WHERE id = 1")
            conn.execute("DELETE FROM tasks WHERE id = 2")
        result = run_cli("run", "tasks", "--url", pg_dsn, "--sink", sink, "--model", "Task",
                         "--until-idle", "1")
        assert result.returncode == 0, result.stderr
        frames = [json.loads(ws.recv(timeout=5))["message"] for _ in range(4)]
    assert [f["type"] for f in frames] == ["delta"] * 4
    assert [f["delta"] for f in frames] == [
        {"type": "insert", "model": "Task", "data": {"id": 1, "color": "blue", "title": "task 1"}},
        {"type": "insert", "model": "Task", "data": {"id": 2, "color": "blue", "title": "task 2"}},
        {"type": "update", "model": "Task",
         "newData": {"id": 1, "color": "blue", "title": "renamed"}, "oldData": {"id": 1}},
        {"type": "delete", "model": "Task", "data": {"id": 2}},
    ]


def test_where_filter_and_dead_letters(pg_dsn, tasks, tmp_path):
    out, dead = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    args = ["run", "tasks", "--url", pg_dsn, "--sink", str(out), "--where", "title != 'spam'",
            "--filter", '["==", "color", "blue"]', "--model", "Task"]
    create_slot(pg_dsn, "--sink", str(out))
    insert_rows(pg_dsn, range(1, 3))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO tasks VALUES (3, 'blue', 'spam')")
        conn.execute("INSERT INTO tasks VALUES (4, 'red', 'x')")
        conn.execute("UPDATE tasks SET color = 'red' WHERE id = 1")  # no old values: fails
        conn.execute("INSERT INTO tasks VALUES (5, 'blue', 'after')")

    # Without a dead-letter file the update stops the pipeline, with a hint how to fix it.
    result = run_cli(*args, "--until-idle", "1")
    assert_one_clear_line(result, "subscription", "REPLICA IDENTITY FULL")
    assert result.returncode == 5
    assert [json.loads(line)["data"]["id"] for line in out.read_text().splitlines()] == [1, 2]

    # With one, the failed change goes there and the rest is delivered. The inserts before the
    # failure were acknowledged by the first run, so they do not come again.
    result = run_cli(*args, "--dead-letter", str(dead), "--until-idle", "1")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["data"]["id"] for line in out.read_text().splitlines()] == [1, 2, 5]
    [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["stage"].startswith("subscription")
    assert "REPLICA IDENTITY FULL" in letter["error"]
    assert letter["change"]["operation"] == "update" and letter["change"]["key"] == {"id": 1}


def test_processes_sink_killed_mid_stream_restart_loses_nothing(pg_dsn, tasks, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["run", "tasks", "--url", pg_dsn, "--sink", str(out), "--processes"]
    create_slot(pg_dsn, "--sink", str(out))
    committed: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                conn.execute("INSERT INTO tasks VALUES (%s, 'blue', 'w')", [i])
                committed.append(i)
                time.sleep(0.002)  # the writer's pace

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with start_cli(*args) as cli:
            process = cli.process
            cli.wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 100,
                         "the sink's first 100 rows", 30)
            assert len(out.read_text().splitlines()) >= 100, "the sink wrote too little in 30 s"
            workers = children(process.pid)
            assert len(workers) == 1  # the sink, which writes the format (to_delta) first
            os.kill(workers[-1], signal.SIGKILL)
            cli.finish(timeout=30)
            stderr = cli.stderr
    finally:
        stop.set()
        thread.join()
    assert process.returncode == 5
    assert "died with exit code -9" in stderr and "Traceback" not in stderr

    result = run_cli(*args, "--until-idle", "1.5")
    assert result.returncode == 0, result.stderr
    delivered = [json.loads(line)["data"]["id"] for line in out.read_text().splitlines()]
    assert set(delivered) == set(committed)  # every committed row, after the crash too
    assert len(delivered) < 2 * len(committed)


@pytest.mark.parametrize("args, fragment", [
    (["--where", "status === 1"], "cannot read --where"),
    (["--filter", '["~", "a", 1]'], "unknown filter operator"),
    (["--sink", "ftp://x"], "unsupported sink"),
    (["--sink", "redis://127.0.0.1:1/0"], "needs a stream name"),
    (["--where", "(" * 5000 + "a == 1" + ")" * 5000], "nested more than 100 levels"),
    (["--where", "not " * 5000 + "a == 1"], "nested more than 100 levels"),
    (["--filter", '["not", ' * 5000 + '["==", "a", 1]' + "]" * 5000], "100 levels"),
    (["--filter", '["or", ' * 150 + '["==", "a", 1]' + "]" * 150], "at most 100 levels"),
])
def test_bad_pipeline_options_fail_before_connecting(args, fragment):
    # The URL points nowhere: the options must be refused before any connection is tried.
    result = run_cli("run", "tasks", "--url", "postgresql://127.0.0.1:1/db", *args)
    assert_one_clear_line(result, fragment)
    assert result.returncode == 2
