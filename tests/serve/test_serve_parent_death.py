"""``changefeed serve`` killed with SIGKILL: every pipeline process (and the worker processes of a
pipeline with ``processes = true``) ends within `BOUND` seconds, also one whose webhook never
answers and one stuck in a stage (which cannot stop cleanly: it exits after its
``stop_timeout``); a new server then delivers everything that was committed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg
import pytest
from proctools import descendants, ended, wait_ended
from serving import Serve, jsonl, orders_config, stage_path
from stuck import STUCK_STAGE, Silent

pytestmark = pytest.mark.postgres

BOUND = 15.0
"""Seconds within which every process of a killed server must end (a pipeline gets
``stop_timeout = 3`` to stop cleanly, then exits by itself)."""


def insert(dsn: str, ids: range) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for i in ids:
            conn.execute("INSERT INTO orders VALUES (%s, %s)", [i, i * 10])


def test_killing_the_server_ends_every_pipeline_process_and_worker(tmp_path: Path, pg_dsn, pg):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    endpoint = Silent()
    config = orders_config(tmp_path, stop_timeout=3, pipelines=f'''
[pipelines.plain]
sink = "{tmp_path}/plain.jsonl"

[pipelines.workers]
processes = true
where = "id > 0"
sink = "{tmp_path}/workers.jsonl"

[pipelines.hung]
sink = "{endpoint.url}"

[pipelines.stuck]
stages = ["stuck_stage:stuck"]
sink = "{tmp_path}/stuck.jsonl"
''')
    (tmp_path / "stuck_stage.py").write_text(STUCK_STAGE)
    env = {"DATABASE_URL": pg_dsn, "PYTHONPATH": os.pathsep.join([str(tmp_path), stage_path()])}
    processes: list[int] = []
    try:
        with Serve(config, env=env) as serve:
            serve.wait_until(lambda: serve.answering() and all(
                serve.state(name) in ("streaming", "retrying")
                for name in ("plain", "workers", "hung", "stuck")), "the pipelines to stream")
            insert(pg_dsn, range(1, 51))
            for name in ("plain", "workers"):
                serve.wait_until(lambda name=name: len(jsonl(tmp_path / f"{name}.jsonl")) == 50,
                                 f"the rows of {name}")
            processes = descendants(serve.process.pid)
            # four pipeline processes, and the workers of one: where, format, sink
            assert len(processes) >= 7, processes
            insert(pg_dsn, range(51, 101))
            os.kill(serve.process.pid, signal.SIGKILL)
            serve.process.wait(30)
            wait_ended(processes, BOUND, "the processes of a killed server")
    finally:
        endpoint.close()
        for pid in processes:  # a failed test leaves nothing behind
            if not ended(pid):
                os.kill(pid, signal.SIGKILL)

    config.write_text(config.read_text().replace("[pipelines.hung]", "[pipelines.hung]\n"
                                                 "enabled = false").replace(
        "[pipelines.stuck]", "[pipelines.stuck]\nenabled = false"))
    with Serve(config, env=env) as serve:
        serve.wait_ready()
        for name in ("plain", "workers"):
            serve.wait_until(lambda name=name: {row["data"]["id"] for row in jsonl(
                tmp_path / f"{name}.jsonl")} == set(range(1, 101)), f"every row of {name}")
        assert serve.stop() == 0
