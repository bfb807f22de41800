"""The README's "Guarantees (PostgreSQL)" about tables, each checked on a real server.

* every kind of row identity (primary key, identity index, FULL with and without a key, none)
  gives each row the same key in the snapshot (chunked and exported) and in the stream, in
  every format and as the Kafka record key; a consumer upserting by key ends with the table;
* a snapshot of a table without key, killed mid-way again and again while rows are deleted and
  updated, resumes and leaves the consumer with exactly the table (no retaken snapshot);

Writes are made after the feed says it is streaming, and every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import feeds
import orjson
import psycopg
import pytest
from clitools import json_lines_before_kill, run_cli, start_cli

from changefeed import ALL, Change, ConfigurationError, Operation, Retry
from changefeed.backends.postgres import PostgresChangeFeed, streaming
from changefeed.backends.postgres import feed as feed_module
from changefeed.formats import debezium
from changefeed.formats.records import RecordEncoder
from changefeed.formats.registry import FORMAT_NAMES

pytestmark = pytest.mark.postgres


def make_feed(dsn, table, operation=ALL, **options) -> PostgresChangeFeed:
    return PostgresChangeFeed(table, operation, connection=dsn,
                              retry=Retry(initial=0.05, maximum=0.5), **options)


def drain(feed, *, idle=0.5, timeout=60):
    """Everything ``feed`` has now (until ``idle`` seconds without a change once caught up with
    the server's WAL: see `feeds.drain`), acknowledged."""
    return feeds.drain(feed, idle=idle, timeout=timeout, close=True)


def frozen(row: dict[str, Any]) -> tuple:
    return tuple(sorted((name, json.dumps(value, default=str)) for name, value in row.items()))


class KeyedConsumer:
    """Applies changes by key, as a consumer that upserts does: an insert or update stores the
    row under its key (an update that changed the key removes the old key first), a delete
    removes its key. ``strict``: a change must name a key the consumer holds (an update or a
    delete of a key never seen means snapshot and stream disagree on keys)."""

    def __init__(self, *, strict: bool = True) -> None:
        self.rows: dict[tuple, dict] = {}
        self.strict = strict

    def apply(self, change: Change) -> None:
        key = frozen(change.key)
        if change.operation is Operation.DELETE:
            found = self.rows.pop(key, None)
            assert found is not None or not self.strict, f"delete of unknown key {change.key}"
            return
        if change.operation is Operation.UPDATE and change.old is not None:
            old_key = frozen({name: change.old.get(name) for name in change.key})
            assert old_key in self.rows or not self.strict, f"update of unknown key {change.key}"
            self.rows.pop(old_key, None)
        self.rows[key] = change.new

    def table(self) -> list[tuple]:
        return sorted(frozen(row) for row in self.rows.values())


def table_rows(pg, table: str) -> list[tuple]:
    with pg.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return sorted(frozen(row) for row in cursor.execute(f"SELECT * FROM {table}"))


# -- every kind of row identity ----------------------------------------------------------------

IDENTITIES = {
    # name: (setup, the key columns: None for the whole row, the operations it can stream)
    "primary key": ("CREATE TABLE t (id int PRIMARY KEY, u int NOT NULL, v text)", ["id"], ALL),
    "primary key, FULL": (
        "CREATE TABLE t (id int PRIMARY KEY, u int NOT NULL, v text);"
        " ALTER TABLE t REPLICA IDENTITY FULL", ["id"], ALL),
    "composite primary key": (
        "CREATE TABLE t (id int, u int NOT NULL, v text, PRIMARY KEY (u, id))", ["u", "id"], ALL),
    "identity index": (
        "CREATE TABLE t (id int, u int NOT NULL, v text); CREATE UNIQUE INDEX t_u ON t (u);"
        " ALTER TABLE t REPLICA IDENTITY USING INDEX t_u", ["u"], ALL),
    "identity index beside a primary key": (
        "CREATE TABLE t (id int PRIMARY KEY, u int NOT NULL, v text);"
        " CREATE UNIQUE INDEX t_u ON t (u); ALTER TABLE t REPLICA IDENTITY USING INDEX t_u",
        ["u"], ALL),
    "FULL without key": (
        "CREATE TABLE t (id int, u int NOT NULL, v text); ALTER TABLE t REPLICA IDENTITY FULL",
        None, ALL),
    "FULL, a unique index but no key": (
        "CREATE TABLE t (id int, u int NOT NULL, v text); CREATE UNIQUE INDEX t_u ON t (u);"
        " ALTER TABLE t REPLICA IDENTITY FULL", None, ALL),
    "partitioned, FULL without key": (
        "CREATE TABLE t (id int, u int NOT NULL, v text) PARTITION BY RANGE (u);"
        " CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (0) TO (100);"
        " CREATE TABLE t_2 PARTITION OF t FOR VALUES FROM (100) TO (100000);"
        " ALTER TABLE t REPLICA IDENTITY FULL; ALTER TABLE t_1 REPLICA IDENTITY FULL;"
        " ALTER TABLE t_2 REPLICA IDENTITY FULL; GUARD", None, ALL),
    "no identity (inserts only)": (
        "CREATE TABLE t (id int, u int NOT NULL, v text)", None, Operation.INSERT),
    "REPLICA IDENTITY NOTHING (inserts only)": (
        "CREATE TABLE t (id int PRIMARY KEY, u int NOT NULL, v text);"
        " ALTER TABLE t REPLICA IDENTITY NOTHING", ["id"], Operation.INSERT),
}


def key_columns(expected, row) -> list[str]:
    return list(row) if expected is None else expected


@pytest.mark.parametrize("snapshot", ["chunked", "exported"])
@pytest.mark.parametrize("identity", list(IDENTITIES))
def test_every_kind_of_identity_gives_the_same_key_in_snapshot_and_stream(
    pg_dsn, pg, monkeypatch, identity, snapshot
):
    setup, expected, operations = IDENTITIES[identity]
    setup = setup.replace("GUARD", identity_guard_sql())  # (see the partitioned tests below)
    if snapshot == "exported":
        monkeypatch.setattr(feed_module, "in_chunks", lambda version, tables: False)
    pg.execute(setup)
    pg.execute("INSERT INTO t SELECT g, g * 10, 'row ' || g FROM generate_series(1, 40) g")
    feed = make_feed(pg_dsn, "t", operations, prefeed="snapshot", chunk_size=7)
    consumer = KeyedConsumer()
    first = drain(feed)
    assert len(first) == 40 and all(c.snapshot for c in first)
    for change in first:
        assert list(change.key) == key_columns(expected, change.new), change
        consumer.apply(change)
    # The stream: an insert, updates of a value and of the key columns, deletes.
    pg.execute("INSERT INTO t VALUES (41, 410, 'new'), (42, 420, 'new')")
    pg.execute("UPDATE t SET v = 'changed' WHERE id IN (3, 41)")
    pg.execute("UPDATE t SET u = u + 1 WHERE id = 5")
    pg.execute("DELETE FROM t WHERE id IN (7, 42)")
    stream = drain(make_feed(pg_dsn, "t", operations))
    expected_ops = ([Operation.INSERT] * 2 if operations == Operation.INSERT else
                    [Operation.INSERT] * 2 + [Operation.UPDATE] * 3 + [Operation.DELETE] * 2)
    assert [c.operation for c in stream] == expected_ops
    for change in stream:
        row = change.new if change.new is not None else change.old
        assert list(change.key) == key_columns(expected, row), change
        assert change.key == {name: row[name] for name in change.key}
        consumer.apply(change)
    if operations == ALL:
        assert consumer.table() == table_rows(pg, "t")
    # Every format carries that key: the Kafka record key, and the envelopes' own.
    for change in [*first[:2], *stream]:
        for fmt in FORMAT_NAMES:
            (record, *_) = RecordEncoder(fmt=fmt).records(change, change.position)
            assert orjson.loads(record.key) == json.loads(json.dumps(change.key, default=str))
        assert change.to_dict()["key"] == change.key
        event = debezium.DebeziumEncoder()(change)
        if change.operation is Operation.UPDATE and "FULL" in identity:
            assert event["before"] == change.old  # the whole old row, not taken for a key


@pytest.mark.parametrize("identity", ["identity index", "FULL without key", "primary key"])
def test_a_consumer_of_change_lines_upserting_by_key_ends_with_the_table(pg_dsn, pg, identity):
    """The issue's case: 2,041 rows, the consumer kept 1,161 when snapshot keys were empty."""
    pg.execute(IDENTITIES[identity][0])
    pg.execute("INSERT INTO t SELECT g, g, 'row ' || g FROM generate_series(1, 2000) g")
    args = ["run", "t", "--url", pg_dsn, "--prefeed", "snapshot", "--format", "change",
            "--chunk-size", "300"]
    with start_cli(*args) as process:
        process.wait_streaming()
        pg.execute("INSERT INTO t SELECT g, g, 'late' FROM generate_series(2001, 2041) g")
        pg.execute("UPDATE t SET v = 'updated' WHERE id % 10 = 0")
        pg.execute("DELETE FROM t WHERE id % 7 = 0")
        process.wait_for_stderr("snapshot of public.t: done", timeout=60)
        _, out = process.stop()
    rest = run_cli(*args, "--until-idle", "2")  # what the first run had not read yet
    assert rest.returncode == 0, rest.stderr
    consumer = KeyedConsumer(strict=False)
    for line in [*out.splitlines(), *rest.stdout.splitlines()]:
        item = json.loads(line)
        if item.get("type") != "snapshot":
            consumer.apply(Change(Operation[item["operation"].upper()], item["table"],
                                  item.get("new"), item.get("old"), item["key"]))
    assert consumer.table() == table_rows(pg, "t")


# -- a snapshot of a table without key, killed again and again ---------------------------------


def test_a_snapshot_of_a_table_without_key_killed_mid_way_never_starts_again(pg_dsn, pg):
    """The issue's case: a FULL table without key, its snapshot interrupted: it used to be taken
    again from a new slot, and rows deleted between the attempts were never deleted downstream.
    Here the feed is killed (SIGKILL) four times mid-snapshot, rows are deleted and updated
    between the attempts, and the consumer must end with exactly the table."""
    pg.execute("CREATE TABLE k (id int NOT NULL, v int, note text)")
    pg.execute("ALTER TABLE k REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO k SELECT g, 0, repeat('x', 50) FROM generate_series(1, 30000) g")
    consumer = KeyedConsumer(strict=False)
    args = ["run", "k", "--url", pg_dsn, "--prefeed", "snapshot", "--format", "change",
            "--chunk-size", "500"]
    markers = []
    for attempt in range(4):
        with start_cli(*args) as process:
            process.wait_for_stderr("rows, 1 chunks" if attempt == 0 else "streaming",
                                    timeout=60)
            lines = process.read_json(600 + 300 * attempt, timeout=60)
            _, out = process.stop(signal.SIGKILL)
        items = lines + json_lines_before_kill(out)
        markers += [i["state"] for i in items if i.get("type") == "snapshot"]
        for item in items:
            if item.get("type") != "snapshot":
                consumer.apply(Change(Operation[item["operation"].upper()], item["table"],
                                      item.get("new"), item.get("old"), item["key"]))
        # Between the attempts: deletes and updates in chunks done and chunks to come.
        pg.execute(f"DELETE FROM k WHERE id % {97 + attempt} = 0")
        pg.execute(f"UPDATE k SET v = v + 1 WHERE id % {89 + attempt} = 0")
    rest = run_cli(*args, "--until-idle", "3", timeout=180)
    assert rest.returncode == 0, rest.stderr
    markers += apply_lines(consumer, rest.stdout)
    assert consumer.table() == table_rows(pg, "k")
    assert "taking it again" not in rest.stderr
    assert markers == ["started", "done"]  # said once: the snapshot never started again
    slots = pg.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0]
    assert slots == 1


# -- limits of the server the feed runs on -----------------------------------------------------

STRICT_DATABASE = {
    "statement_timeout": "1ms",
    "lock_timeout": "1ms",
    "idle_in_transaction_session_timeout": "20ms",
    "idle_session_timeout": "200ms",
    "default_transaction_read_only": "on",
    "default_transaction_isolation": "serializable",
}
"""Database defaults that used to cancel every chunk, end exported reads and idle sessions,
or refuse the feed's own writes (watermarks, progress records)."""


def strict_database(pg, dsn: str, settings: dict[str, str] = STRICT_DATABASE) -> None:
    database = dsn.rsplit("/", 1)[1]
    for name, value in settings.items():
        pg.execute(f"ALTER DATABASE {database} SET {name} = '{value}'")


def apply_lines(consumer: KeyedConsumer, text: str) -> list[str]:
    """Apply ``--format change`` lines; returns the snapshot markers among them."""
    markers = []
    for line in text.splitlines():
        item = json.loads(line)
        if item.get("type") == "snapshot":
            markers.append(item["state"])
        else:
            consumer.apply(Change(Operation[item["operation"].upper()], item["table"],
                                  item.get("new"), item.get("old"), item["key"]))
    return markers


@pytest.mark.parametrize("how", ["chunked", "chunked without key", "exported"])
def test_database_timeouts_and_read_only_defaults_do_not_stop_the_feed(
    pg_dsn, pg, monkeypatch, how
):
    pg.execute("CREATE TABLE big (id int NOT NULL, v int, pad text)")
    if how != "chunked without key":
        pg.execute("ALTER TABLE big ADD PRIMARY KEY (id)")
    else:
        pg.execute("ALTER TABLE big REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO big SELECT g, 0, repeat('p', 200) FROM generate_series(1, 30000) g")
    strict_database(pg, pg_dsn)
    if how == "exported":
        monkeypatch.setattr(feed_module, "in_chunks", lambda version, tables: False)
    feed = make_feed(pg_dsn, "big", prefeed="snapshot", chunk_size=10000)
    # (Chunks interleave with the stream: an update may name a row whose chunk comes later.)
    consumer = KeyedConsumer(strict=how == "exported")
    for number, change in enumerate(feed.changes(idle_timeout=2, timeout=120)):
        consumer.apply(change)
        feed.ack(change.position)
        if number % 1000 == 0:  # a slow consumer: the exported read idles in its transaction
            time.sleep(0.05)
        if number == 20000:
            pg.execute("UPDATE big SET v = 1 WHERE id % 100 = 0")
            pg.execute("DELETE FROM big WHERE id % 77 = 0")
    feed.close()
    assert feed.stats.reconnects == 0
    assert consumer.table() == table_rows(pg, "big")


def test_a_feed_that_keeps_losing_its_server_is_not_idle(pg_dsn, pg):
    """The issue's case: every chunk was cancelled, the feed reconnected with no progress, and
    ``--until-idle 3`` exited 0 having delivered nothing. Here the server ends every connection
    of the database for a while (the feed's chunk reads, its stream, its reconnects): the run
    never counts that as idle, and ends only once every row is delivered."""
    pg.execute("CREATE TABLE c (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO c SELECT g, 0 FROM generate_series(1, 3000) g")
    stop = threading.Event()
    ended = []
    ours = pg.info.backend_pid

    def end_connections():
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            while not stop.is_set():
                ended.extend(admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND pid <> %s", [ours],
                ).fetchall())
                time.sleep(0.005)  # the killer's pace

    thread = threading.Thread(target=end_connections)
    with start_cli("run", "c", "--url", pg_dsn, "--prefeed", "snapshot", "--format",
                   "change", "--chunk-size", "500", "--until-idle", "0.5") as process:
        try:
            process.wait_streaming()
            thread.start()
            process.wait_for_stderr("reconnecting", timeout=60)
            time.sleep(2)  # four times the idle timeout without progress
        finally:
            stop.set()
            if thread.is_alive():
                thread.join()
        returncode, out = process.finish(timeout=120)
    assert ended and returncode == 0, process.stderr
    consumer = KeyedConsumer(strict=False)
    assert "started" in apply_lines(consumer, out)
    assert consumer.table() == table_rows(pg, "c")


def test_until_idle_waits_while_the_slot_is_far_behind(pg_dsn, pg):
    """The issue's case: ``--until-idle`` exited 0 with "0 changes" while the server was still
    decoding: idle must mean caught up with the server's WAL."""
    pg.execute("CREATE TABLE w (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE other (id int, pad text)")
    assert run_cli("run", "w", "--url", pg_dsn, "--until-idle", "0.2").returncode == 0
    # Far behind: WAL the walsender must read through before it reaches the watched rows,
    # one large transaction of a table not watched, one of the watched table.
    pg.execute("INSERT INTO other SELECT g, repeat('x', 100) FROM generate_series(1, 600000) g")
    with pg.transaction():
        pg.execute("INSERT INTO w SELECT generate_series(1, 100000)")
    result = run_cli("run", "w", "--url", pg_dsn, "--format", "change", "--until-idle",
                     "0.2", "-q", timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 100000


MEASURE_FEED = """
import resource, sys
from changefeed.backends.postgres import PostgresChangeFeed, feed as feed_module
from changefeed.formats.change_dict import change_line
url, table, how = sys.argv[1:]
if how == "exported":
    feed_module.in_chunks = lambda version, tables: False
feed = PostgresChangeFeed(table, connection=url, prefeed="snapshot")
count = size = 0
for change in feed.changes(idle_timeout=1, timeout=240):
    size += len(change_line(change))  # what changefeed run writes, made and dropped
    count += 1
    feed.ack(change.position)
feed.close()
# VmHWM: this process's own peak. ru_maxrss also counts the parent's peak before the exec
# (a pytest worker that grew large), which says nothing of the feed.
try:
    peak = next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(count, size, peak)
"""


@pytest.mark.parametrize("how", ["by key", "by ctid", "exported"])
def test_a_snapshot_of_large_rows_keeps_memory_flat(pg_dsn, pg, how):
    """The issue's case: 120 rows of 5 MB took 1.86 GB of memory (a chunk held all of them).
    A chunk is bounded in bytes as well as rows, and so is each fetch of an exported read:
    the feed's peak RSS stays within a few chunks' size, not the table's."""
    pg.execute("CREATE TABLE blobs (id int, data bytea)")
    if how == "by key":
        pg.execute("ALTER TABLE blobs ADD PRIMARY KEY (id)")
    else:
        pg.execute("ALTER TABLE blobs REPLICA IDENTITY FULL")
    pg.execute("ALTER TABLE blobs ALTER data SET STORAGE EXTERNAL")  # no compression
    pg.execute("INSERT INTO blobs SELECT g, convert_to(repeat(md5(g::text), 5 << 15), 'UTF8')"
               " FROM generate_series(1, 40) g")  # 40 rows of 5 MB: 200 MB
    measured = subprocess.run([sys.executable, "-c", MEASURE_FEED, pg_dsn, "blobs", how],
                              capture_output=True, text=True, timeout=300)
    assert measured.returncode == 0, measured.stderr
    count, size, peak_kb = map(int, measured.stdout.split())
    assert count == 40 and size > 40 * 5 << 20  # each line holds its row's 5 MB
    print(f"peak RSS ({how}): {peak_kb / 1024:.0f} MB for 40 rows of 5 MB")
    assert peak_kb < 250 * 1024


# -- structure changes the application makes ---------------------------------------------------


class Reader:
    """A feed read in this process in steps, every change applied to a consumer and
    acknowledged, with the structure checks made often (instead of every 5 s)."""

    def __init__(self, feed: PostgresChangeFeed, consumer: KeyedConsumer) -> None:
        self.feed = feed
        self.consumer = consumer
        self.changes = feed.changes(timeout=300, ticks=True)
        self.got: list[Change] = []

    def until(self, done, timeout: float = 60) -> None:
        """Read until ``done(self)`` holds at a moment the stream is quiet."""
        deadline = time.monotonic() + timeout
        for change in self.changes:
            if change is not None:
                self.got.append(change)
                self.consumer.apply(change)
                self.feed.ack(change.position)
            elif done(self):
                return
            assert time.monotonic() < deadline, f"not done within {timeout} s"

    def idle(self, seconds: float = 1.5) -> None:
        """Read until the feed is caught up and nothing came for ``seconds``."""
        state = {"count": -1, "since": 0.0}

        def quiet(reader: Reader) -> bool:
            now = time.monotonic()
            if len(reader.got) != state["count"] or not reader.feed.caught_up:
                state["count"], state["since"] = len(reader.got), now
            return now - state["since"] >= seconds

        self.until(quiet)

    def close(self) -> None:
        self.changes.close()
        self.feed.close()

    @classmethod
    def run(cls, feed: PostgresChangeFeed, consumer: Any, steps: Any = ()) -> None:
        """One run of ``feed``: caught up, then each step (some DDL or writes) and caught up
        again after it; closed at the end."""
        reader = cls(feed, consumer)
        try:
            reader.idle()
            for step in steps:
                step()
                reader.idle()
        finally:
            reader.close()


@pytest.fixture
def often(monkeypatch):
    """The feed compares the catalog with what it knows every 0.2 s instead of 5 s."""
    monkeypatch.setattr(streaming, "CHECK_SECONDS", 0.2)


class TableConsumer:
    """A `KeyedConsumer` per table name."""

    def __init__(self) -> None:
        self.tables: dict[str, KeyedConsumer] = {}

    def apply(self, change: Change) -> None:
        self.tables.setdefault(change.table, KeyedConsumer(strict=False)).apply(change)

    def table(self, name: str) -> list[tuple]:
        consumer = self.tables.get(name)
        return consumer.table() if consumer is not None else []


def readme_section(title: str) -> str:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    return text.split(f"### {title}", 1)[1].split("\n#", 1)[0]


def identity_guard_sql() -> str:
    """The event trigger exactly as the README gives it."""
    section = readme_section("Partitioned tables without a primary key")
    return section.split("```sql\n", 1)[1].split("```", 1)[0]


PARTITIONED_FULL = (
    "CREATE TABLE r (id int NOT NULL, v text) PARTITION BY RANGE (id);"
    " CREATE TABLE r_1 PARTITION OF r FOR VALUES FROM (0) TO (100);"
    " ALTER TABLE r REPLICA IDENTITY FULL; ALTER TABLE r_1 REPLICA IDENTITY FULL"
)


@pytest.mark.parametrize("ops", [ALL, Operation.UPDATE, Operation.DELETE])
def test_a_partitioned_table_without_key_is_refused_unless_new_partitions_get_an_identity(
    pg_dsn, pg, ops
):
    pg.execute(PARTITIONED_FULL)
    with pytest.raises(ConfigurationError, match="partitioned without a primary key.*event"
                                                 " trigger changefeed_replica_identity"):
        list(make_feed(pg_dsn, "r", ops).changes(timeout=10))
    assert pg.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
    assert pg.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
    result = run_cli("run", "r", "--url", pg_dsn, "--ops", ",".join(ops.names), timeout=30)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    # Inserts only are fine: nothing the application does can fail then.
    feed = make_feed(pg_dsn, "r", Operation.INSERT)
    assert drain(feed) == []
    pg.execute("CREATE TABLE r_2 PARTITION OF r FOR VALUES FROM (100) TO (200)")
    pg.execute("INSERT INTO r VALUES (150, 'x')")
    pg.execute("UPDATE r SET v = 'y' WHERE id = 150")  # r_2 has no identity: fine, inserts only
    later = drain(make_feed(pg_dsn, "r", Operation.INSERT))
    assert [c.new for c in later if not c.snapshot] == [{"id": 150, "v": "x"}]
    assert [c.new for c in later if c.snapshot] == [{"id": 150, "v": "y"}]  # r_2, read once


@pytest.mark.parametrize("how", ["created", "attached with rows", "created in a sub-partition"])
def test_with_the_readme_s_event_trigger_new_partitions_keep_the_application_working(
    pg_dsn, pg, often, how
):
    pg.execute(PARTITIONED_FULL)
    pg.execute(identity_guard_sql())
    pg.execute("INSERT INTO r SELECT g, 'first' FROM generate_series(0, 99) g")
    consumer = KeyedConsumer(strict=False)
    reader = Reader(make_feed(pg_dsn, "r", prefeed="snapshot", chunk_size=30), consumer)
    try:
        reader.idle()
        if how == "created":
            pg.execute("CREATE TABLE r_2 PARTITION OF r FOR VALUES FROM (100) TO (200)")
        elif how == "attached with rows":
            pg.execute("CREATE TABLE r_2 (id int NOT NULL, v text)")
            pg.execute("INSERT INTO r_2 SELECT g, 'before' FROM generate_series(100, 149) g")
            pg.execute("ALTER TABLE r ATTACH PARTITION r_2 FOR VALUES FROM (100) TO (200)")
        else:
            pg.execute("CREATE TABLE r_2 PARTITION OF r FOR VALUES FROM (100) TO (200)"
                       " PARTITION BY RANGE (id)")
            pg.execute("CREATE TABLE r_2a PARTITION OF r_2 FOR VALUES FROM (100) TO (200)")
        # The application's own statements on the new partition work.
        pg.execute("INSERT INTO r SELECT g, 'new' FROM generate_series(150, 159) g")
        pg.execute("UPDATE r SET v = 'updated' WHERE id IN (5, 120, 155)")
        pg.execute("DELETE FROM r WHERE id IN (6, 130, 156)")
        reader.idle()
    finally:
        reader.close()
    assert consumer.table() == table_rows(pg, "r")


def test_a_partition_without_identity_while_the_feed_runs_is_said_and_refused_on_restart(
    pg_dsn, pg, often, caplog
):
    pg.execute(PARTITIONED_FULL)
    pg.execute(identity_guard_sql())
    reader = Reader(make_feed(pg_dsn, "r"), KeyedConsumer(strict=False))
    try:
        reader.idle()
        pg.execute("DROP EVENT TRIGGER changefeed_replica_identity")  # the guard is gone
        pg.execute("CREATE TABLE r_2 PARTITION OF r FOR VALUES FROM (100) TO (200)")
        reader.until(lambda r: "public.r_2 has no replica identity" in caplog.text)
    finally:
        reader.close()
    assert "ALTER TABLE public.r_2 REPLICA IDENTITY FULL" in caplog.text
    result = run_cli("run", "r", "--url", pg_dsn, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "already publishes it, so they fail now" in result.stderr
    assert "changefeed slots --drop changefeed_r" in result.stderr


@pytest.mark.parametrize("order", [
    "attach while running", "attach while stopped", "detach, change, attach again"])
def test_partitions_attached_with_rows_are_back_filled(pg_dsn, pg, often, caplog, order):
    pg.execute("CREATE TABLE p (id int, v text, PRIMARY KEY (id)) PARTITION BY RANGE (id)")
    pg.execute("CREATE TABLE p_1 PARTITION OF p FOR VALUES FROM (0) TO (1000)")
    pg.execute("CREATE TABLE p_2 PARTITION OF p FOR VALUES FROM (1000) TO (2000)")
    pg.execute("INSERT INTO p SELECT g, 'first' FROM generate_series(0, 1999, 7) g")
    pg.execute("CREATE TABLE p_3 (LIKE p INCLUDING ALL)")
    pg.execute("INSERT INTO p_3 SELECT g, 'before' FROM generate_series(2000, 2999, 3) g")
    consumer = KeyedConsumer(strict=False)

    def run(steps):
        Reader.run(make_feed(pg_dsn, "p", prefeed="snapshot", chunk_size=50), consumer, steps)

    attach = ("ALTER TABLE p ATTACH PARTITION p_3 FOR VALUES FROM (2000) TO (3000)",)
    if order == "attach while running":
        run([lambda: pg.execute(attach[0])])
    elif order == "attach while stopped":
        run([])
        pg.execute(attach[0])
        pg.execute("UPDATE p SET v = 'after' WHERE id % 5 = 0")
        run([])
    else:
        left = []

        def detach():
            pg.execute("ALTER TABLE p DETACH PARTITION p_2")
            left.extend(table_rows(pg, "p_2 WHERE id % 3 = 0"))  # as the consumer has them
            pg.execute("UPDATE p_2 SET v = 'changed while detached' WHERE id % 2 = 0")
            pg.execute("DELETE FROM p_2 WHERE id % 3 = 0")

        run([detach, lambda: pg.execute(
            "ALTER TABLE p ATTACH PARTITION p_2 FOR VALUES FROM (1000) TO (2000)")])
        assert "public.p no longer holds p_2 (detached or dropped)" in caplog.text
        # Rows changed while detached are read again; those deleted meanwhile left with the
        # partition, as said: no delete reaches the consumer for them.
        assert consumer.table() == sorted(table_rows(pg, "p") + left)
        return
    assert consumer.table() == table_rows(pg, "p")


def test_an_update_moving_rows_between_partitions_is_said_with_ops_update(pg_dsn, pg):
    pg.execute("CREATE TABLE p (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    pg.execute("CREATE TABLE p_1 PARTITION OF p FOR VALUES FROM (0) TO (10)")
    result = run_cli("run", "p", "--url", pg_dsn, "--ops", "update", "--until-idle", "0.5")
    assert result.returncode == 0, result.stderr
    assert ("an UPDATE that moves a row of public.p to another partition is a delete and an"
            " insert there, which --ops update does not deliver") in result.stderr
    for ops in ("insert,update,delete", "insert"):
        quiet = run_cli("run", "p", "--url", pg_dsn, "--ops", ops, "--until-idle", "0.5")
        assert "moves a row" not in quiet.stderr


@pytest.mark.parametrize("when", ["while running", "while stopped"])
def test_a_table_created_under_a_pattern_is_streamed_and_back_filled(
    pg_dsn, pg, often, when
):
    pg.execute("CREATE SCHEMA app")
    pg.execute("CREATE TABLE app.a (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO app.a SELECT g, 'a' FROM generate_series(1, 50) g")
    consumer = TableConsumer()

    def run(steps=()):
        # No --prefeed snapshot: a table that appears later is new, its rows are changes.
        Reader.run(make_feed(pg_dsn, "app.*", slot="apps"), consumer, steps)

    def create():
        pg.execute("CREATE TABLE app.b (id int PRIMARY KEY, v text)")
        pg.execute("INSERT INTO app.b SELECT g, 'b' FROM generate_series(1, 120) g")
        pg.execute("CREATE TABLE app.c (id int, v text)")  # no identity: refused, said
        pg.execute("INSERT INTO app.a VALUES (51, 'a')")

    run()
    if when == "while running":
        run([create, lambda: pg.execute("UPDATE app.b SET v = 'changed' WHERE id < 10")])
    else:
        create()
        run()
        pg.execute("UPDATE app.b SET v = 'changed' WHERE id < 10")
        run()
    assert consumer.table("app.b") == table_rows(pg, "app.b")
    assert len(consumer.table("app.a")) == 1  # (no snapshot of app.a: only the new row)


@pytest.mark.parametrize("prefeed", [None, "snapshot"])
def test_a_schema_renamed_is_said_and_its_tables_changes_take_the_new_name(
    pg_dsn, pg, often, caplog, prefeed
):
    pg.execute("CREATE SCHEMA s1")
    pg.execute("CREATE TABLE s1.t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO s1.t SELECT g, 'x' FROM generate_series(1, 40) g")
    consumer = TableConsumer()
    reader = Reader(make_feed(pg_dsn, "s1.t", prefeed=prefeed, chunk_size=15), consumer)
    try:
        reader.idle()
        pg.execute("ALTER SCHEMA s1 RENAME TO s2")
        reader.until(lambda r: "table s1.t is now s2.t" in caplog.text)
        pg.execute("INSERT INTO s2.t VALUES (41, 'after')")
        pg.execute("UPDATE s2.t SET v = 'after' WHERE id = 1")
        reader.idle()
    finally:
        reader.close()
    after = [c for c in reader.got if c.new and c.new.get("v") == "after"]
    assert {c.table for c in after} == {"s2.t"}
    assert "the stream does not say when a schema is renamed" in caplog.text
    if prefeed == "snapshot":  # read again under its new name: the consumer has it whole
        assert consumer.table("s2.t") == table_rows(pg, "s2.t")


def test_tables_swapped_by_renames_stream_under_their_new_names(pg_dsn, pg, often, caplog):
    pg.execute("CREATE SCHEMA app")
    for name, rows in (("a", 30), ("c", 20)):
        pg.execute(f"CREATE TABLE app.{name} (id int PRIMARY KEY, origin text)")
        pg.execute(f"INSERT INTO app.{name} SELECT g, '{name}' FROM generate_series(1, {rows}) g")
    consumer = TableConsumer()
    reader = Reader(make_feed(pg_dsn, "app.*", prefeed="snapshot", chunk_size=7), consumer)
    try:
        reader.idle()
        with pg.transaction():  # the swap: a -> b, c -> a
            pg.execute("ALTER TABLE app.a RENAME TO b")
            pg.execute("ALTER TABLE app.c RENAME TO a")
        pg.execute("UPDATE app.a SET origin = origin || ' now a'")
        pg.execute("UPDATE app.b SET origin = origin || ' now b'")
        reader.idle()
    finally:
        reader.close()
    assert consumer.table("app.b") == table_rows(pg, "app.b")
    # Under app.a the consumer holds the rows of the table now called so, and, with keys
    # the old app.a had that the new one lacks, rows of the old: that was said.
    assert set(table_rows(pg, "app.a")) <= set(consumer.table("app.a"))
    assert "table app.a is now app.b" in caplog.text
    assert "a consumer holding rows under app.a must drop them" in caplog.text
