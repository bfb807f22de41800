"""SIGHUP re-reads the config file: a pipeline added starts, a removed one stops cleanly
(delivered and acknowledged), a changed one restarts where it stopped, the others keep
streaming untouched; a file with a problem changes nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from clitools import json_lines, run_cli
from serving import Serve, jsonl

pytestmark = pytest.mark.postgres

BEFORE = '''
[defaults]
url = "${{DATABASE_URL}}"
tables = "orders"

[pipelines.keep]
sink = "{out}/keep.jsonl"

[pipelines.removed]
sink = "{out}/removed.jsonl"

[pipelines.changed]
where = "total < 50"
sink = "{out}/changed.jsonl"
'''
AFTER = '''
[defaults]
url = "${{DATABASE_URL}}"
tables = "orders"

[pipelines.added]           # new
prefeed = "snapshot"
sink = "{out}/added.jsonl"

[pipelines.changed]
where = "total >= 50"       # was total < 50
sink = "{out}/changed.jsonl"

# keep, as it was (only comments around it changed)
[pipelines.keep]
sink = "{out}/keep.jsonl"
'''


@pytest.fixture
def orders(pg):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    return pg


def insert(pg, ids) -> None:
    for i in ids:
        pg.execute("INSERT INTO orders VALUES (%s, %s)", [i, i * 10])


def ids(path: Path) -> list[int]:
    return [delta["data"]["id"] for delta in jsonl(path)]


def test_sighup_adds_removes_and_changes_pipelines_and_leaves_the_others_alone(
        tmp_path: Path, pg_dsn, orders):
    config = tmp_path / "changefeed.toml"
    config.write_text(BEFORE.format(out=tmp_path))
    with Serve(config, env={"DATABASE_URL": pg_dsn}) as serve:
        serve.wait_ready()
        insert(orders, range(1, 6))
        serve.wait_until(lambda: len(ids(tmp_path / "removed.jsonl")) == 5, "the first rows")
        before = serve.pipelines()

        # A file with a problem: logged, and nothing changes.
        config.write_text(BEFORE.format(out=tmp_path).replace("[pipelines.keep]\n",
                                                              "[pipelines.keep]\nsnik = 1\n"))
        serve.send(signal.SIGHUP)
        serve.wait_until(lambda: "reload failed" in serve.log, "the reload to fail")
        assert f"pipelines: reload failed, keeping what runs: {config}:7: pipelines.keep.snik:" \
               " unknown key; did you mean sink?" in serve.log
        assert {name: p["pid"] for name, p in serve.pipelines().items()} == {
            name: p["pid"] for name, p in before.items()}

        insert(orders, range(6, 11))
        for name in ("keep", "removed", "changed"):  # each has read what came before the reload
            serve.wait_until(lambda n=name: serve.metric("changefeed_changes_read_total",
                                                         pipeline=n) == 10, f"{name} to read")
        config.write_text(AFTER.format(out=tmp_path))
        serve.send(signal.SIGHUP)
        insert(orders, range(11, 16))  # while the reload runs
        serve.wait_until(lambda: "removed" not in serve.pipelines(), "the removal")
        serve.wait_state("added", "streaming", "snapshotting")
        serve.wait_state("changed", "streaming")
        insert(orders, range(16, 21))
        serve.wait_until(lambda: len(ids(tmp_path / "keep.jsonl")) == 20, "keep's rows")
        serve.wait_until(lambda: sorted(set(ids(tmp_path / "added.jsonl"))) == list(
            range(1, 21)), "added's rows")
        serve.wait_until(lambda: ids(tmp_path / "changed.jsonl")[-1:] == [20], "changed's rows")

        after = serve.pipelines()
        assert list(after) == ["added", "changed", "keep"]
        assert after["keep"]["pid"] == before["keep"]["pid"] and after["keep"]["restarts"] == 0
        assert after["changed"]["pid"] != before["changed"]["pid"]
        assert ids(tmp_path / "keep.jsonl") == list(range(1, 21))  # never interrupted
        # The changed pipeline went on from where it stopped, with its new where: rows written
        # during the reload went to the old run (its where dropped them) or to the new one.
        changed = ids(tmp_path / "changed.jsonl")
        assert changed[:4] == [1, 2, 3, 4] and 11 <= changed[4] <= 16, changed
        assert changed[4:] == list(range(changed[4], 21)), changed
        removed = ids(tmp_path / "removed.jsonl")
        assert removed == list(range(1, len(removed) + 1)) and 10 <= len(removed) <= 15
        assert "reloading" in serve.log and "adding added, removing removed, restarting" \
               " changed" in serve.log
        names = {dict(labels)["pipeline"] for (name, labels) in serve.metrics()
                 if name == "changefeed_changes_read_total"}
        assert names == {"added", "changed", "keep"}

        serve.send(signal.SIGHUP)  # the same file again: nothing to do
        serve.wait_until(lambda: "nothing changed" in serve.log, "the second reload")
        assert serve.pipelines()["keep"]["pid"] == before["keep"]["pid"]
        assert serve.stop() == 0

    # The removed pipeline acknowledged all it delivered: its slot holds only what came after.
    rest = run_cli("run", "orders", "--url", pg_dsn, "--slot", "changefeed_removed",
                   "--until-idle", "2", "-q")
    assert rest.returncode == 0, rest.stderr
    assert [d["data"]["id"] for d in json_lines(rest.stdout)] == list(
        range(len(removed) + 1, 21))
