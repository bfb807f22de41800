"""SIGTERM under load: every pipeline delivers what it holds, acknowledges, and the server exits
0; started again, it goes on where each pipeline stopped: nothing lost. As with ``changefeed
run``, a stop in the middle of a transaction leaves that transaction to come again, and a
pipeline with a ``checkpoint`` skips what it already wrote: nothing twice."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest
from serving import Serve, jsonl, orders_config

pytestmark = pytest.mark.postgres


class Writer(threading.Thread):
    """Inserts rows into orders, 20 per transaction, until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.done = threading.Event()
        self.written = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.is_set():
                with conn.transaction():
                    conn.execute("INSERT INTO orders SELECT g, g"
                                 " FROM generate_series(%s::int, %s::int) g",
                                 [self.written + 1, self.written + 20])
                self.written += 20
                self.done.wait(0.01)


def test_sigterm_under_load_then_a_restart_loses_nothing(tmp_path: Path, pg_dsn, pg, receiver):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    config = orders_config(tmp_path, pipelines=f'''
[pipelines.to-file]
checkpoint = "{tmp_path}/to-file.checkpoint"
sink = "{tmp_path}/orders.jsonl"

[pipelines.in-processes]
processes = true            # the stages and the sink in processes of their own
format = "change"
sink = "{tmp_path}/changes.jsonl"

[pipelines.to-webhook]
sink = "{receiver.url}"
''')
    env = {"DATABASE_URL": pg_dsn}

    def webhook_ids() -> list[int]:
        return [d["data"]["id"] for _, body in receiver.accepted() for d in json.loads(body)]

    writer = Writer(pg_dsn)
    with Serve(config, env=env) as serve:
        serve.wait_ready()
        writer.start()
        serve.wait_until(lambda: len(jsonl(tmp_path / "orders.jsonl")) >= 300
                         and len(webhook_ids()) >= 300, "the pipelines to be busy")
        assert serve.stop() == 0  # while the writer goes on
        first_log = serve.log
    writer.done.set()
    writer.join(30)
    for name in ("to-file", "in-processes", "to-webhook"):
        assert f"changefeed: [{name}] stopped\n" in first_log, first_log
    assert "Traceback" not in first_log
    before = len(jsonl(tmp_path / "orders.jsonl"))
    changes_before = len(jsonl(tmp_path / "changes.jsonl"))
    assert before < writer.written  # the stop came in the middle of the load

    with Serve(config, env=env) as again:
        again.wait_ready()
        expected = list(range(1, writer.written + 1))
        again.wait_until(lambda: len(jsonl(tmp_path / "orders.jsonl")) >= writer.written
                         and len(jsonl(tmp_path / "changes.jsonl")) >= writer.written
                         and len(webhook_ids()) >= writer.written, "every row", timeout=120)
        assert [d["data"]["id"] for d in jsonl(tmp_path / "orders.jsonl")] == expected
        for ids in ([c["new"]["id"] for c in jsonl(tmp_path / "changes.jsonl")], webhook_ids()):
            assert list(dict.fromkeys(ids)) == expected  # in order, all of them
            assert len(ids) - len(expected) < 20  # at most the transaction cut by the stop
        # Counted in the sink's own process, reported through the pipeline's process.
        again.wait_until(lambda: again.metric("changefeed_changes_delivered_total",
                                              pipeline="in-processes")
                         == len(jsonl(tmp_path / "changes.jsonl")) - changes_before,
                         "the sink process's counts")
        assert again.stop() == 0
