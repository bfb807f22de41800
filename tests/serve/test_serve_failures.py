"""Failures stay with their pipeline: a sink that fails makes only its pipeline unready and
retrying (and its lag rise) while the others deliver; a stage that raises fails only its
pipeline for good; a pipeline's process killed is restarted and loses nothing."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from clitools import run_cli
from serving import Serve, jsonl, orders_config

pytestmark = pytest.mark.postgres


@pytest.fixture
def orders(pg):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    return pg


def insert(pg, ids) -> None:
    with pg.transaction():
        for i in ids:
            pg.execute("INSERT INTO orders VALUES (%s, %s)", [i, i * 10])


def test_a_failing_sink_fails_only_its_pipeline_which_retries_then_catches_up(
        tmp_path: Path, pg_dsn, orders, receiver):
    receiver.fail_first = 10**9  # every request answered 503 until healed
    config = orders_config(tmp_path, pipelines=f'''
[pipelines.to-file]
sink = "{tmp_path}/orders.jsonl"

[pipelines.to-webhook]
sink = "{receiver.url}"

[pipelines.buggy]
stages = ["example_stages:explode_on_13"]
sink = "{tmp_path}/buggy.jsonl"
''')
    with Serve(config, env={"DATABASE_URL": pg_dsn}) as serve:
        serve.wait_ready()
        insert(orders, range(1, 11))
        serve.wait_until(lambda: len(jsonl(tmp_path / "orders.jsonl")) == 10, "the file's rows")
        hook = serve.wait_state("to-webhook", "retrying")
        assert hook["ready"] is False and "503" in hook.get("error", ""), hook
        assert serve.get("/readyz")[0] == 503 and serve.get("/healthz")[0] == 200
        assert serve.state("to-file") == "streaming" and serve.state("buggy") == "streaming"
        serve.wait_until(lambda: serve.metric("changefeed_retries_total", pipeline="to-webhook",
                                              side="sink") >= 2, "two retries of the webhook")
        # The lag of the held changes rises; the file pipeline has none.
        first = serve.metric("changefeed_lag_seconds", pipeline="to-webhook")
        serve.wait_until(lambda: serve.metric("changefeed_lag_seconds", pipeline="to-webhook")
                         > first + 1, "the webhook pipeline's lag to rise")
        assert serve.metric("changefeed_lag_seconds", pipeline="to-file") == 0.0
        insert(orders, range(11, 14))  # 13 breaks the buggy stage for good
        buggy = serve.wait_state("buggy", "failed")
        assert "stage explode_on_13 failed" in buggy["error"] and "unlucky row 13" in (
            buggy["error"])
        serve.wait_until(lambda: len(jsonl(tmp_path / "orders.jsonl")) == 13, "the file's rows")
        # The sink counts a batch once it is written: the file may show it a moment before.
        serve.wait_until(lambda: serve.metric("changefeed_changes_delivered_total",
                                              pipeline="to-file") == 13, "the file's count")
        status = run_cli("status", "--url", serve.url)
        assert status.returncode == 1, status.stderr
        rows = {line.split()[1]: line.split() for line in status.stdout.splitlines()[1:-1]}
        assert rows["to-file"][2:4] == ["streaming", "yes"] and rows["to-file"][4] == "13"
        assert rows["to-webhook"][2:4] == ["retrying", "no"]
        assert rows["buggy"][2:4] == ["failed", "no"] and "unlucky row 13" in status.stdout
        assert status.stdout.splitlines()[-1] == "not ready"

        receiver.fail_first = 0  # healed: the held batch and the rest go through
        serve.wait_state("to-webhook", "streaming")
        serve.wait_until(lambda: serve.metric("changefeed_lag_seconds", pipeline="to-webhook")
                         == 0.0, "the lag to fall to 0")
        delivered = sorted(d["data"]["id"] for _, body in receiver.accepted()
                           for d in json.loads(body))
        assert delivered == list(range(1, 14))
        assert serve.metric("changefeed_changes_delivered_total", pipeline="to-webhook") == 13
        assert serve.pipelines()["buggy"]["restarts"] == 0  # failed for good: not restarted
        assert [r["data"]["id"] for r in jsonl(tmp_path / "buggy.jsonl")] == list(range(1, 13))

        # SIGHUP starts a failed pipeline again (its cause may have been fixed elsewhere); this
        # stage still raises on row 13, so it fails again, having repeated only the rows of
        # that transaction before 13 (without a checkpoint a transaction comes again whole).
        failed_pid, file_pid = buggy.get("pid"), serve.pipelines()["to-file"]["pid"]
        serve.send(signal.SIGHUP)
        serve.wait_until(lambda: "restarting buggy" in serve.log, "the reload")
        serve.wait_until(lambda: serve.state("buggy") == "failed"
                         and serve.pipelines()["buggy"].get("since") != buggy["since"],
                         "the restarted pipeline to fail again")
        assert serve.log.count("stage explode_on_13 failed") >= 2
        assert serve.pipelines()["to-file"]["pid"] == file_pid and failed_pid is None
        assert [r["data"]["id"] for r in jsonl(tmp_path / "buggy.jsonl")] == [*range(1, 13),
                                                                             11, 12]
        assert serve.stop() == 0


def test_a_killed_pipeline_process_is_restarted_and_loses_nothing(tmp_path, pg_dsn, orders):
    config = orders_config(tmp_path, restart_delay=0.2, pipelines=f'''
[pipelines.victim]
sink = "{tmp_path}/victim.jsonl"

[pipelines.bystander]
sink = "{tmp_path}/bystander.jsonl"
''')
    with Serve(config, env={"DATABASE_URL": pg_dsn}) as serve:
        serve.wait_ready()
        insert(orders, range(1, 6))
        serve.wait_until(lambda: len(jsonl(tmp_path / "victim.jsonl")) == 5, "the first rows")
        victim, bystander = serve.pipelines()["victim"], serve.pipelines()["bystander"]
        os.kill(victim["pid"], signal.SIGKILL)
        serve.wait_until(lambda: serve.pipelines()["victim"].get("pid") not in (
            None, victim["pid"]) and serve.state("victim") == "streaming", "the restart")
        insert(orders, range(6, 11))
        serve.wait_until(lambda: {r["data"]["id"] for r in jsonl(tmp_path / "victim.jsonl")}
                         == set(range(1, 11)), "every row in the victim's file")
        serve.wait_until(lambda: len(jsonl(tmp_path / "bystander.jsonl")) == 10, "the others")
        after = serve.pipelines()
        assert after["victim"]["restarts"] == 1
        assert after["bystander"]["pid"] == bystander["pid"]
        assert after["bystander"]["restarts"] == 0
        assert serve.metric("changefeed_restarts_total", pipeline="victim") == 1
        assert "ended without a word (signal 9)" in serve.log
        assert serve.stop() == 0
