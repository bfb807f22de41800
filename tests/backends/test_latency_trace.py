"""The opt-in latency trace (``CHANGEFEED_LATENCY_TRACE``, `changefeed.backends.postgres.tracing`)
that ``benchmarks/bench_latency.py --trace`` reads: one record per transaction, its times in
the order a change goes through them, joined to the output by commit time."""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest
from clitools import json_lines, run_cli

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("implementation", ["c", "python"])
def test_each_transaction_is_traced_from_commit_to_flush(pg_dsn, pg, tmp_path, implementation):
    pg.execute("CREATE TABLE traced (id int PRIMARY KEY, note text)")
    trace = tmp_path / "trace.jsonl"
    args = ("run", "traced", "--url", pg_dsn, "--slot", "traced", "--format", "change",
            "--idle-timeout", "0.3", "-q")
    env = {"CHANGEFEED_IMPL": implementation}
    assert run_cli(*args, env=env).returncode == 0  # the slot, from here on
    for number in range(3):  # a transaction each
        pg.execute("INSERT INTO traced VALUES (%s, 'n')", [number])
    with pg.transaction():
        pg.execute("INSERT INTO traced VALUES (10, 'a'), (11, 'b')")
    result = run_cli(*args, env={**env, "CHANGEFEED_LATENCY_TRACE": str(trace)})
    assert result.returncode == 0, result.stderr
    committed = [datetime.fromisoformat(line["committed_at"]).timestamp()
                 for line in json_lines(result.stdout)]
    assert len(committed) == 5
    rows = [orjson.loads(line) for line in trace.read_bytes().splitlines()]
    transactions = [row for row in rows if "commit" in row]
    assert [round(row["commit"], 6) for row in transactions] == sorted(
        {round(at, 6) for at in committed})
    for row in transactions:  # same machine, same clock
        assert row["commit"] <= row["sent"] <= row["read"] <= row["flushed"], row
    assert all(set(row) in ({"gc", "at", "ms"}, {"quiet_work", "ms"}, {"flush", "ms"})
               for row in rows if "commit" not in row)

