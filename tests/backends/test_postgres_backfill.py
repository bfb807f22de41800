"""Many tables through one slot, and snapshots in key chunks that resume (DBLog), on a real
server: the consumer that applies the output in order ends with exactly the tables' rows."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from clitools import run_cli, start_cli, whole_lines
from feeds import drain, make_feed, start

from changefeed import UNCHANGED, Change, Operation, SnapshotState
from changefeed.backends.postgres import backfill as backfill_module
from changefeed.backends.postgres.backfill import table_backfill
from changefeed.backends.postgres.backfill_reads import read_again, read_chunk
from changefeed.backends.postgres.copy import CopyReader
from changefeed.backends.postgres.tables import Table


class Consumer:
    """Applies `--format change` lines (or changes) in order: inserts and updates as upserts,
    deletes of unknown keys as no-ops; what a consumer of the feed must do."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[tuple, dict]] = {}
        self.markers: list[tuple[str, str]] = []

    def apply(self, item: dict) -> None:
        if item.get("type") == "snapshot":
            self.markers.append((item["table"], item["state"]))
            return
        rows = self.tables.setdefault(item["table"], {})
        key = tuple(sorted(item["key"].items()))
        if item["operation"] == "delete":
            rows.pop(key, None)
        else:
            rows[key] = item["new"]

    def apply_lines(self, text: str) -> int:
        lines = [line for line in text.splitlines() if line.strip()]
        for line in lines:
            self.apply(json.loads(line))
        return len(lines)

    def apply_change(self, change) -> None:
        self.apply({"table": change.table, "key": change.key, "new": change.new,
                    "operation": change.operation.name.lower()})

    def rows(self, table: str) -> dict[int, dict]:
        return {dict(key)["id"]: row for key, row in self.tables.get(table, {}).items()}


def table_rows(pg, table: str) -> dict[int, dict]:
    with pg.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return {row["id"]: row for row in cursor.execute(f"SELECT * FROM {table}")}


class Writers:
    """Threads inserting, updating and deleting rows of tables until stopped."""

    def __init__(self, dsn: str, tables: list[str], start_id: int = 100_000) -> None:
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._write, args=(dsn, table, start_id + 10_000 * n))
            for n, table in enumerate(tables)
        ]

    def _write(self, dsn: str, table: str, next_id: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            step = 0
            while not self.stop.is_set():
                conn.execute(f"INSERT INTO {table} (id, v) VALUES (%s, 0)", [next_id + step])
                conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = %s", [1 + step * 7 % 500])
                conn.execute(f"DELETE FROM {table} WHERE id = %s", [2 + step * 13 % 500])
                step += 1
                time.sleep(0.002)  # the writer's pace

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def make_tables(pg, *names: str, rows: int = 500) -> None:
    for name in names:
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int, note text)")
        pg.execute(f"INSERT INTO {name} SELECT g, 0, 'x' FROM generate_series(1, {rows}) g")


def test_three_tables_stream_through_one_slot_and_one_walsender(pg_dsn, pg):
    make_tables(pg, "a", "b", "c", rows=0)
    pg.execute("CREATE TABLE not_watched (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, ["a", "b", "c"])
    changes = feed.changes(timeout=30, ticks=True)
    assert next(changes) is None  # streaming now
    try:
        senders = pg.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]
        assert senders == 1
        assert pg.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 1
        with pg.transaction():
            for table in ("c", "not_watched", "a", "b"):
                pg.execute(f"INSERT INTO {table} (id) VALUES (1)")
        got = []
        for change in changes:
            if change is not None:
                got.append(change.table)
                feed.ack(change.position)
            if len(got) == 3:
                break
    finally:
        changes.close()
    assert got == ["public.c", "public.a", "public.b"]


def test_patterns_exclude_and_models_per_table_from_the_cli(pg_dsn, pg):
    pg.execute("CREATE SCHEMA app")
    for name in ("app.orders", "app.order_lines", "app.audit", "public.other"):
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int)")
    start(make_feed(pg_dsn, "app.*", slot="apps", exclude=["app.audit"]))
    for name in ("app.orders", "app.order_lines", "app.audit", "public.other"):
        pg.execute(f"INSERT INTO {name} VALUES (1, 1)")
    result = run_cli("run", "app.*", "--exclude", "app.audit", "--slot", "apps", "--url", pg_dsn,
                     "--model", "app.orders=Order", "--model", "Line", "--until-idle", "2")
    assert result.returncode == 0, result.stderr
    deltas = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(d["model"] for d in deltas) == ["Line", "Order"]
    nothing = run_cli("run", "app.nope_*", "--url", pg_dsn, "--until-idle", "1")
    assert nothing.returncode == 2 and "no table matches 'app.nope_*'" in nothing.stderr
    several = run_cli("run", "a", "b", "--url", "mongodb://127.0.0.1:1/db")
    assert several.returncode == 2 and "PostgreSQL URLs only" in several.stderr


def test_snapshot_markers_and_progress_in_change_format(pg_dsn, pg):
    make_tables(pg, "big", rows=3000)
    make_tables(pg, "empty", rows=0)
    result = run_cli("run", "big", "empty", "--url", pg_dsn, "--prefeed", "snapshot",
                     "--format", "change", "--chunk-size", "500", "--until-idle", "3")
    assert result.returncode == 0, result.stderr
    items = [json.loads(line) for line in result.stdout.splitlines()]
    markers = [(i["table"], i["state"]) for i in items if i.get("type") == "snapshot"]
    assert sorted(markers) == [("public.big", "done"), ("public.big", "started"),
                               ("public.empty", "done"), ("public.empty", "started")]
    big = [i for i in items if i.get("table") == "public.big"]
    assert big[0] == {"type": "snapshot", "table": "public.big", "state": "started",
                      "position": big[0]["position"]}
    assert big[-1]["state"] == "done" and len(big) == 3002
    assert all(i["snapshot"] is True for i in big[1:-1])
    positions = [i["position"] for i in items]
    assert positions == sorted(positions)  # acknowledged in order like any change
    # six full chunks and the empty one that shows the end
    assert "snapshot of public.big: done, 3,000 rows in 7 chunks" in result.stderr
    assert "snapshot of public.big: 500 / ~3,000 rows, 1 chunks" in result.stderr


def test_a_table_added_to_a_named_feed_is_back_filled_while_the_others_stream(pg_dsn, pg):
    make_tables(pg, "a", "b", "c")
    consumer = Consumer()
    first = run_cli("run", "a", "b", "--slot", "mine", "--url", pg_dsn, "--prefeed", "snapshot",
                    "--format", "change", "--until-idle", "2")
    assert first.returncode == 0, first.stderr
    consumer.apply_lines(first.stdout)
    with Writers(pg_dsn, ["a", "b", "c"]):
        time.sleep(0.5)  # changes to a and b while the feed is away: the slot keeps them
        with start_cli("run", "a", "b", "c", "--slot", "mine", "--url", pg_dsn,
                       "--prefeed", "snapshot", "--format", "change", "--chunk-size", "100"
                       ) as again:
            again.wait_for_stderr("snapshot of public.c: done", timeout=60)
            _, out = again.stop()
        errors = again.stderr
    consumer.apply_lines(out)
    # The writers have stopped: one more run to the end of the stream.
    last = run_cli("run", "a", "b", "c", "--slot", "mine", "--url", pg_dsn,
                   "--prefeed", "snapshot", "--format", "change", "--until-idle", "2")
    consumer.apply_lines(last.stdout)
    for table in ("a", "b", "c"):
        assert consumer.rows(f"public.{table}") == table_rows(pg, table), table
    assert "slot mine now also streams public.c (back-filled first)" in errors
    # A table taken off the list leaves the publication.
    fewer = run_cli("run", "a", "--slot", "mine", "--url", pg_dsn, "--until-idle", "1")
    assert fewer.returncode == 0 and "no longer streams b, c" in fewer.stderr
    tables = pg.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = 'mine'")
    assert [row[0] for row in tables] == ["a"]


def test_kill_9_mid_snapshot_then_changes_then_rerun_leaves_exactly_the_table(pg_dsn, pg):
    make_tables(pg, "big", rows=20_000)
    consumer = Consumer()
    argv = ("run", "big", "--url", pg_dsn, "--prefeed", "snapshot", "--format", "change",
            "--chunk-size", "500")
    with start_cli(*argv) as process:
        process.wait_for_stderr("rows, 1 chunks", timeout=60)  # the first chunk is delivered
        _, out = process.stop(signal.SIGKILL)
    delivered = consumer.apply_lines(whole_lines(out))
    assert 0 < delivered < 20_000  # whole lines only: SIGKILL may cut the last one
    pg.execute("DELETE FROM big WHERE id % 97 = 0")  # in chunks done and chunks to come
    pg.execute("UPDATE big SET v = 42 WHERE id % 89 = 0")
    pg.execute("INSERT INTO big SELECT g, 7, 'new' FROM generate_series(30001, 30100) g")
    rerun = run_cli(*argv, "--until-idle", "3", timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    again = consumer.apply_lines(rerun.stdout)
    assert consumer.rows("public.big") == table_rows(pg, "big")
    assert again < 20_000 + 500 * 4, "the snapshot started again from the first row"


def test_a_postgresql_restart_mid_snapshot_does_not_start_it_again(pg_dsn, pg_server):
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        make_tables(pg, "big", rows=20_000)
    feed = make_feed(pg_dsn, "big", prefeed="snapshot", chunk_size=500)
    consumer = Consumer()
    snapshot_rows = 0
    # Restarted from another thread, so the feed keeps reading while the server stops: a
    # walsender waits (up to wal_sender_timeout) for its client to take the rest of the WAL.
    restarter = threading.Thread(target=pg_server.restart)
    for change in feed.changes(timeout=120, idle_timeout=3):
        consumer.apply_change(change)
        feed.ack(change.position)
        snapshot_rows += change.snapshot
        if snapshot_rows == 5_000 and restarter.ident is None:
            restarter.start()
    restarter.join(120)
    assert snapshot_rows >= 5_000 and not restarter.is_alive()
    assert feed.stats.reconnects >= 1
    with psycopg.connect(pg_dsn, autocommit=True) as pg:
        assert consumer.rows("public.big") == table_rows(pg, "big")
    assert snapshot_rows < 20_000 + 500 * 2, "the snapshot started again from the first row"


def test_updates_inside_the_chunk_being_read_win_over_the_chunk(pg_dsn, pg):
    # Every key is updated again and again with a growing version while the snapshot reads
    # it in small chunks: a consumer never sees a key's version go back.
    pg.execute("CREATE TABLE hot (id int PRIMARY KEY, version int)")
    pg.execute("INSERT INTO hot SELECT g, 0 FROM generate_series(1, 2000) g")
    stop = threading.Event()

    def bump():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            version = 0
            while not stop.is_set():
                version += 1
                conn.execute("UPDATE hot SET version = %s WHERE id %% 50 = %s",
                             [version, version % 50])

    feed = make_feed(pg_dsn, "hot", prefeed="snapshot", chunk_size=100)
    thread = threading.Thread(target=bump)
    thread.start()
    seen: dict[int, int] = {}
    went_back = []
    try:
        for change in feed.changes(timeout=120, idle_timeout=3):
            key, version = change.key["id"], change.new["version"]
            if version < seen.get(key, -1):
                went_back.append((key, seen[key], version, change.snapshot))
            seen[key] = version
            feed.ack(change.position)
            if len(seen) == 2000 and not stop.is_set():
                stop.set()
    finally:
        stop.set()
        thread.join()
    assert went_back == []
    assert seen == dict(pg.execute("SELECT id, version FROM hot").fetchall())


def test_changefeed_backfill_asks_a_running_feed_to_read_a_table_again(pg_dsn, pg):
    make_tables(pg, "t", rows=1200)
    start(make_feed(pg_dsn, "t", slot="live"))
    with start_cli("run", "t", "--slot", "live", "--url", pg_dsn, "--format", "change",
                   "--chunk-size", "250") as process:
        process.wait_streaming()
        requested = run_cli("backfill", "t", "--slot", "live", "--url", pg_dsn)
        assert requested.returncode == 0, requested.stderr
        process.wait_for_stderr("snapshot of public.t: done, 1,200 rows", timeout=60)
        _, out = process.stop()
    items = [json.loads(line) for line in out.splitlines()]
    assert sorted(i["key"]["id"] for i in items if i.get("snapshot")) == list(range(1, 1201))
    unknown = run_cli("backfill", "t", "--slot", "nope", "--url", pg_dsn)
    assert unknown.returncode == 2 and "no replication slot named 'nope'" in unknown.stderr
    pg.execute("CREATE TABLE other (id int PRIMARY KEY)")
    wrong = run_cli("backfill", "other", "--slot", "live", "--url", pg_dsn)
    assert wrong.returncode == 2 and "does not stream public.other" in wrong.stderr


def test_masked_feed_back_fills_as_inserts(pg_dsn, pg):
    make_tables(pg, "m", rows=30)
    feed = make_feed(pg_dsn, "m", operation=Operation.DELETE, prefeed="snapshot")
    got = drain(feed)
    # A snapshot row is an insert whatever the mask: it is what the consumer lacks.
    assert len(got) == 30 and {c.operation for c in got} == {Operation.INSERT}


@pytest.mark.parametrize("chunk", [4, 5])
def test_runs_that_end_at_a_chunks_last_row_go_on_with_the_next_chunk(pg_dsn, pg, chunk):
    # A chunk's rows are handed out inside its watermark's transaction: a run whose --limit
    # ends at a chunk's last row ends before that Commit was read, and must still pass it.
    make_tables(pg, "t", rows=10)
    args = ["run", "t", "--url", pg_dsn, "--prefeed", "snapshot", "--chunk-size", str(chunk),
            "--format", "change", "-q"]
    # (--limit counts the snapshot's "started" marker too; a resumed snapshot does not repeat it)
    runs = [run_cli(*args, "--limit", str(chunk + 1)), run_cli(*args, "--limit", str(chunk))]
    runs += [run_cli(*args, "--until-idle", "2"), run_cli(*args, "--until-idle", "1")]
    assert [r.returncode for r in runs] == [0] * 4, [r.stderr for r in runs]
    got = [[line["key"]["id"] if "key" in line else line["state"]
            for line in map(json.loads, r.stdout.splitlines())] for r in runs]
    rows = list(range(1, 11))
    assert got == [["started", *rows[:chunk]], rows[chunk:2 * chunk], [*rows[2 * chunk:], "done"],
                   []]


KEYS = {  # key type -> (key columns, their values for row n)
    "int": ("id int PRIMARY KEY", "n * 3"),
    "text with escapes": ("k text PRIMARY KEY", "format(E'k\\t%s\\\\\\n\"é\\r', n)"),
    "uuid": ("u uuid PRIMARY KEY", "md5(n::text)::uuid"),
    "composite": ("a int, b text, PRIMARY KEY (a, b)", "n % 7, format(E'b\\\\%s\\t', n)"),
    "none (the whole row, by ctid)": ("id int", "n * 3"),
}


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("fmt", ["change", "delta"])
@pytest.mark.parametrize("key", list(KEYS))
def test_rows_the_stream_changes_while_their_chunk_is_open_never_go_back(pg_dsn, pg, key, fmt,
                                                                        impl):
    # A writer updates every row, one commit each, round and round, while the snapshot reads
    # the table in small chunks: open windows see stream changes of their keys (the rows'
    # index by key is then made). On both paths and in both formats, no row's version ever
    # goes back, and once the writer stops the consumer holds exactly the table.
    columns, values = KEYS[key]
    pg.execute(f"CREATE TABLE t ({columns}, n int UNIQUE NOT NULL, version int NOT NULL)")
    pg.execute(f"INSERT INTO t SELECT {values}, n, 0 FROM generate_series(1, 300) n")
    if "PRIMARY KEY" not in columns:  # its updates carry the whole old row: its key
        pg.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    stop = threading.Event()
    commits = []

    def write():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            step = 0
            while not stop.is_set():
                conn.execute("UPDATE t SET version = version + 1 WHERE n = %s", [step % 300 + 1])
                step += 1
        commits.append(step)

    writer = threading.Thread(target=write)
    seen: dict[int, int] = {}
    went_back = []
    with start_cli("run", "t", "--url", pg_dsn, "--prefeed", "snapshot", "--chunk-size", "20",
                   "--format", fmt, env={"CHANGEFEED_IMPL": impl}) as process:
        writer.start()

        def read_until(condition: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 120
            while not condition():
                assert time.monotonic() < deadline, f"{what} not within 120 s: {seen}"
                item = json.loads(process.readline(timeout=60))
                row = item.get("new") if fmt == "change" else item.get("data",
                                                                      item.get("newData"))
                if row is not None:
                    n, version = row["n"], row["version"]
                    if version < seen.get(n, -1):
                        went_back.append((n, seen[n], version))
                    seen[n] = version

        try:
            read_until(lambda: "snapshot of public.t: done" in process.stderr
                       and len(seen) == 300, "every row")
        finally:
            stop.set()
            writer.join()
        final = dict(pg.execute("SELECT n, version FROM t").fetchall())
        read_until(lambda: seen == final, "the writer's last versions")
    assert went_back == []
    assert commits[0] > 300  # every row was changed while the snapshot read it


# -- TOASTed values an update leaves out --------------------------------------------------------
# Under the default replica identity an UPDATE sends a TOASTed value it did not change as
# `UNCHANGED`. Where the stream's update takes a chunk's row out of its window (or moves a row to
# a key read already), that update cannot stand for the row: the consumer never had its value.
# The row is read again by key after the window, and the chunk is recorded only after that.

BODY = "(SELECT string_agg(md5(n::text || i::text), '') FROM generate_series(1, 700) i)"
"""~22 kB of text that does not compress below the TOAST threshold: stored out of line."""


class MergingConsumer:
    """Applies changes in order as a consumer must under the default replica identity: an
    update's `UNCHANGED` values keep what the row had (and stay missing if it had nothing)."""

    def __init__(self) -> None:
        self.rows: dict[tuple, dict] = {}
        self.markers: list[str] = []

    def apply(self, operation: str, key: dict, new: dict | None, unchanged=()) -> None:
        token = tuple(sorted(key.items()))
        if operation == "delete":
            self.rows.pop(token, None)
            return
        row = dict(self.rows.get(token, {}))
        row.update({name: value for name, value in new.items() if value is not UNCHANGED})
        for name in unchanged:
            row.setdefault(name, UNCHANGED)
        self.rows[token] = row

    def apply_change(self, change) -> None:
        if isinstance(change, SnapshotState):
            self.markers.append(change.state)
        elif isinstance(change, Change):
            old_key = change.old and {name: change.old[name] for name in change.key}
            if old_key and old_key != change.key:
                self.apply("delete", old_key, None)
            self.apply(change.operation.name.lower(), change.key, change.new,
                       [name for name, value in (change.new or {}).items() if value is UNCHANGED])

    def apply_line(self, item: dict) -> None:
        if item.get("type") == "snapshot":
            self.markers.append(item["state"])
            return
        if item["operation"] == "update" and item.get("old"):
            old_key = {name: item["old"][name] for name in item["key"] if name in item["old"]}
            if old_key and old_key != item["key"]:
                self.apply("delete", old_key, None)
        self.apply(item["operation"], item["key"], item.get("new"), item.get("unchanged", ()))

    def bodies(self) -> dict[tuple, tuple]:
        """Each row's key -> (v, md5 of its body, or UNCHANGED where it never came)."""
        return {token: (row["v"], row["body"] if row["body"] is UNCHANGED
                        else hashlib.md5(row["body"].encode()).hexdigest())
                for token, row in self.rows.items()}


def table_bodies(pg, key_columns: list[str]) -> dict[tuple, tuple]:
    keys = ", ".join(key_columns)
    with pg.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return {tuple(sorted((name, row[name] if isinstance(row[name], int | str)
                              else str(row[name])) for name in key_columns)):  # as in JSON
                (row["v"], row["md5"])
                for row in cursor.execute(f"SELECT {keys}, v, md5(body) FROM docs")}


def test_rows_an_update_without_their_toasted_value_took_out_of_a_chunk_are_read_again(
        pg_dsn, pg, monkeypatch):
    # Scripted writes right after chunk reads, so each lands inside that chunk's window: every
    # member of the class (a value updated, a key changed inside the chunk and into keys read
    # already, a row updated then deleted, a row read again updated again, the last chunk).
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, v int NOT NULL, body text NOT NULL)")
    pg.execute(f"INSERT INTO docs SELECT n, 0, {BODY} FROM generate_series(1, 40) n")
    writes = {
        1: ["UPDATE docs SET v = v + 1 WHERE id IN (2, 3)",
            "UPDATE docs SET id = 105, v = v + 1 WHERE id = 5",   # to keys not read yet
            "UPDATE docs SET id = -35, v = v + 1 WHERE id = 35",  # to keys read already
            "UPDATE docs SET v = v + 1 WHERE id = 7", "DELETE FROM docs WHERE id = 7"],
        2: ["UPDATE docs SET v = v + 1 WHERE id = -35"],  # read again, and changed again
    }
    reads = []

    def then_write(read):
        def reading(conn, backfill, *args, **kwargs):
            window = read(conn, backfill, *args, **kwargs)
            reads.append((read.__name__, len(window.rows)))
            statements = writes.get(len(reads), [])
            if any(row["id"] == 38 for row in window.rows):
                statements = [*statements, "UPDATE docs SET v = v + 1 WHERE id = 38"]
            with psycopg.connect(pg_dsn, autocommit=True) as other:
                for statement in statements:
                    other.execute(statement)
            return window
        return reading

    monkeypatch.setattr(backfill_module, "read_chunk", then_write(backfill_module.read_chunk))
    monkeypatch.setattr(backfill_module, "read_again", then_write(backfill_module.read_again))
    consumer = MergingConsumer()
    feed = make_feed(pg_dsn, "docs", prefeed="snapshot", chunk_size=10)
    snapshot_rows = []
    for change in drain(feed, idle=1.0, timeout=60):
        consumer.apply_change(change)
        if isinstance(change, Change) and change.snapshot:
            snapshot_rows.append(change.key["id"])
        if isinstance(change, SnapshotState) and change.state == "done":
            snapshot_rows.append("done")
    assert consumer.bodies() == table_bodies(pg, ["id"])
    assert ("read_again", 2) in reads  # the rows given new keys: 105 and -35
    for key in (2, 3, 38, 105, -35):  # each made whole once (105 also read in its chunk)
        assert snapshot_rows.count(key) == 1 + (key == 105), (key, snapshot_rows)
    assert 7 not in snapshot_rows
    feed.close()


def test_a_feed_cut_short_before_the_rows_read_again_reads_their_chunk_again(
        pg_dsn, pg, monkeypatch):
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, v int NOT NULL, body text NOT NULL)")
    pg.execute(f"INSERT INTO docs SELECT n, 0, {BODY} FROM generate_series(1, 30) n")
    def first_then_write(conn, backfill, *args, **kwargs):
        window = read_chunk(conn, backfill, *args, **kwargs)
        if backfill.done == 0 and backfill.after is None:
            with psycopg.connect(pg_dsn, autocommit=True) as other:  # rows read again
                other.execute("UPDATE docs SET id = 102 WHERE id = 2")
                other.execute("UPDATE docs SET id = -3 WHERE id = 3")
        return window

    monkeypatch.setattr(backfill_module, "read_chunk", first_then_write)
    consumer = MergingConsumer()
    feed = make_feed(pg_dsn, "docs", prefeed="snapshot", chunk_size=10)
    for change in feed.changes(timeout=30):
        consumer.apply_change(change)
        feed.ack(change.position)
        if isinstance(change, Change) and change.snapshot and change.key["id"] == 10:
            break  # the chunk's rows are acknowledged; the rows read again are not out yet
    feed.close()
    assert {token: value[1] for token, value in consumer.bodies().items()
            if token in ((("id", 102),), (("id", -3),))} == {(("id", 102),): UNCHANGED,
                                                            (("id", -3),): UNCHANGED}
    monkeypatch.setattr(backfill_module, "read_chunk", read_chunk)
    again = make_feed(pg_dsn, "docs", prefeed="snapshot", chunk_size=10)
    got = drain(again, idle=1.0, timeout=60, close=True)
    for change in got:
        consumer.apply_change(change)
    # The updates that gave rows new keys come again (the slot was held before them), their
    # rows are read again (before or after the first chunk, as the stream brings them), and
    # the first chunk comes again (-3 is in its keys now), not the rows after it.
    assert [c.key["id"] for c in got if isinstance(c, Change) and not c.snapshot][:2] == [
        102, -3]
    snapshot = [c.key["id"] for c in got if isinstance(c, Change) and c.snapshot]
    first_chunk = [-3, 1, *range(4, 12)]
    assert snapshot[:10] == first_chunk or snapshot[2:12] == first_chunk, snapshot
    assert consumer.bodies() == table_bodies(pg, ["id"])


TOAST_KEYS = {name: KEYS[name] for name in ("int", "text with escapes", "uuid", "composite")}


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("key", list(TOAST_KEYS))
def test_a_snapshot_beside_updates_that_leave_toasted_values_out_ends_with_every_value(
        pg_dsn, pg, key, impl):
    # A writer updates rows' small column round and round, their TOASTed bodies untouched,
    # while the CLI reads the table in small chunks (the direct path where built): once it
    # stops, a consumer applying the lines holds every row's body exactly.
    columns, values = TOAST_KEYS[key]
    pg.execute(f"CREATE TABLE docs ({columns}, n int UNIQUE NOT NULL, v int NOT NULL,"
               " body text NOT NULL)")
    pg.execute(f"INSERT INTO docs SELECT {values}, n, 0, {BODY} FROM generate_series(1, 200) n")
    key_columns = [name for name, in pg.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'docs'::regclass AND i.indisprimary")]
    stop = threading.Event()
    commits = []

    def write():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            step = 0
            while not stop.is_set():
                conn.execute("UPDATE docs SET v = v + 1 WHERE n = %s", [step * 7 % 200 + 1])
                step += 1
        commits.append(step)

    consumer = MergingConsumer()
    writer = threading.Thread(target=write)
    with start_cli("run", "docs", "--url", pg_dsn, "--prefeed", "snapshot", "--chunk-size",
                   "20", "--format", "change", env={"CHANGEFEED_IMPL": impl}) as process:
        writer.start()
        try:
            deadline = time.monotonic() + 120
            while "done" not in consumer.markers:
                assert time.monotonic() < deadline, "the snapshot did not end within 120 s"
                consumer.apply_line(json.loads(process.readline(timeout=60)))
        finally:
            stop.set()
            writer.join()
        final = table_bodies(pg, key_columns)
        deadline = time.monotonic() + 60
        while consumer.bodies() != final:
            assert time.monotonic() < deadline, "the writer's last updates did not arrive"
            try:
                line = process.readline(timeout=30)
            except AssertionError as exc:
                got = consumer.bodies()
                differ = [(key, got.get(key), row) for key, row in final.items()
                          if got.get(key) != row]
                raise AssertionError(f"rows that differ (key, got, table): {differ[:5]}") from exc
            consumer.apply_line(json.loads(line))
    assert commits[0] > 200  # rows were updated while the snapshot read them


READ_AGAIN_KEYS = {  # key type -> the column's SQL, its value for row n
    "bigint": ("bigint", "n * 10000000000"),
    "numeric": ("numeric", "n / 7.0"),
    "text": ("text", "format(E'k''\\t%s\\\\\"é', n)"),
    "varchar": ("varchar(20)", "'v' || n"),
    "uuid": ("uuid", "md5(n::text)::uuid"),
    "timestamptz": ("timestamptz",
                    "'2026-12-03 09:30:00.123456+02'::timestamptz + n * interval '1 s'"),
    "timestamp": ("timestamp", "'2026-12-03 09:30:00'::timestamp + n * interval '1 ms'"),
    "date": ("date", "'2026-01-01'::date + n"),
    "bytea": ("bytea", "decode(md5(n::text), 'hex')"),
    "float8": ("float8", "n / 3.0"),
    "enum": ("mood", "(enum_range(NULL::mood))[n % 3 + 1]"),
    "domain": ("code", "'c-' || n"),
    "interval": ("interval", "n * interval '1 mon 1 day 1.5 s' - interval '1 year'"),
    "date, infinite": ("date",
                       "CASE n WHEN 5 THEN 'infinity'::date ELSE '2026-01-01'::date + n END"),
    "float8, NaN": ("float8", "CASE n WHEN 5 THEN 'NaN'::float8 ELSE n / 3.0 END"),
    "timetz": ("timetz", "'12:00:00+02'::timetz + n * interval '1 min'"),
    "inet": ("inet", "('10.0.0.' || n)::inet"),
}


@pytest.mark.parametrize("key", list(READ_AGAIN_KEYS))
def test_rows_read_again_by_key_are_the_rows_of_those_keys(pg_dsn, pg, key):
    # The keys come from the stream's values (Python): each is written back as a literal of
    # its column's type, and finds exactly its row.
    column, value = READ_AGAIN_KEYS[key]
    pg.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    pg.execute("CREATE DOMAIN code AS text CHECK (VALUE <> '')")
    pg.execute(f"CREATE TABLE docs (k {column}, n int, v int, PRIMARY KEY (k, n))")
    pg.execute(f"INSERT INTO docs SELECT {value}, n, n FROM generate_series(1, 12) n")
    oid = pg.execute("SELECT 'docs'::regclass::oid").fetchone()[0]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        backfill = table_backfill(conn, Table(oid, "public", "docs", "r", ["k", "n"]),
                                  "public.docs")
        reader = CopyReader()
        every = read_chunk(conn, backfill, reader, chunk_size=100, chunk_bytes=1 << 20).rows
        wanted = [row for row in every if row["n"] % 3 != 1]  # n = 5 among them
        backfill.reread = {backfill.token(row): backfill.key_of(row) for row in wanted}
        again = read_again(conn, backfill, reader, chunk_bytes=1 << 20)
    def rows(found):  # repr: NaN is not equal to itself
        return sorted((row["n"], repr(row)) for row in found)

    assert rows(again.rows) == rows(wanted)
    assert set(again.rereads) == set(backfill.reread)


def test_a_row_moved_into_keys_recorded_already_comes_whole_after_a_restart(
        pg_dsn, pg, monkeypatch):
    # An update moves a row from keys not read yet to keys whose chunks are recorded, its
    # TOASTed value left out; the consumer acknowledges it and the feed stops before the row
    # is read again. The slot was held before that update, so the next run streams it again,
    # and reads the row again.
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, v int NOT NULL, body text NOT NULL)")
    pg.execute(f"INSERT INTO docs SELECT n, 0, {BODY} FROM generate_series(1, 40) n")
    moved = []

    def move_once_a_chunk_is_recorded(conn, backfill, *args, **kwargs):
        window = read_chunk(conn, backfill, *args, **kwargs)
        if backfill.chunks >= 1 and not moved:
            assert int(backfill.after[0]) < 40
            with psycopg.connect(pg_dsn, autocommit=True) as other:
                other.execute("UPDATE docs SET id = -40, v = 1 WHERE id = 40")
            moved.append(backfill.after)
        return window

    monkeypatch.setattr(backfill_module, "read_chunk", move_once_a_chunk_is_recorded)
    consumer = MergingConsumer()
    feed = make_feed(pg_dsn, "docs", prefeed="snapshot", chunk_size=10)
    for change in feed.changes(timeout=30):
        consumer.apply_change(change)
        feed.ack(change.position)
        if isinstance(change, Change) and change.key["id"] == -40:
            break  # acknowledged; the row is not read again yet
    feed.close()
    assert moved and consumer.bodies()[(("id", -40),)] == (1, UNCHANGED)
    recorded = pg.execute("SELECT obj_description(oid, 'pg_publication') FROM pg_publication"
                          " WHERE pubname = 'changefeed_docs'").fetchone()[0]
    assert '"after"' in recorded  # the back-fill goes on after a recorded chunk
    monkeypatch.setattr(backfill_module, "read_chunk", read_chunk)
    again = make_feed(pg_dsn, "docs", prefeed="snapshot", chunk_size=10)
    for change in drain(again, idle=1.0, timeout=60, close=True):
        consumer.apply_change(change)
    assert consumer.bodies() == table_bodies(pg, ["id"])
