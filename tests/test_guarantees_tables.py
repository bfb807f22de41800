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

import orjson
import psycopg
import pytest
from clitools import run_cli, start_cli

from changefeed import ALL, Change, Operation, Retry
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.backends.postgres import feed as feed_module
from changefeed.formats import debezium
from changefeed.formats.records import RecordEncoder
from changefeed.formats.registry import FORMAT_NAMES

pytestmark = pytest.mark.postgres


def make_feed(dsn, table, operation=ALL, **options) -> PostgresChangeFeed:
    return PostgresChangeFeed(table, operation, connection=dsn,
                              retry=Retry(initial=0.05, maximum=0.5), **options)


def drain(feed, *, idle=1.5, timeout=60):
    got = []
    for change in feed.changes(idle_timeout=idle, timeout=timeout):
        got.append(change)
        feed.ack(change.position)
    feed.close()
    return got


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
        " ALTER TABLE t_2 REPLICA IDENTITY FULL", None, ALL),
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
        items = lines + [json.loads(line) for line in out.splitlines() if line.strip()]
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
    for line in rest.stdout.splitlines():
        item = json.loads(line)
        if item.get("type") == "snapshot":
            markers.append(item["state"])
        else:
            consumer.apply(Change(Operation[item["operation"].upper()], item["table"],
                                  item.get("new"), item.get("old"), item["key"]))
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
                time.sleep(0.005)

    thread = threading.Thread(target=end_connections)
    with start_cli("run", "c", "--url", pg_dsn, "--prefeed", "snapshot", "--format",
                   "change", "--chunk-size", "500", "--until-idle", "1") as process:
        try:
            process.wait_streaming()
            thread.start()
            process.wait_for_stderr("reconnecting", timeout=60)
            time.sleep(4)  # four times the idle timeout without progress
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
    pg.execute("INSERT INTO other SELECT g, repeat('x', 100) FROM generate_series(1, 1500000) g")
    with pg.transaction():
        pg.execute("INSERT INTO w SELECT generate_series(1, 200000)")
    result = run_cli("run", "w", "--url", pg_dsn, "--format", "change", "--until-idle",
                     "0.2", "-q", timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 200000


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
print(count, size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
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
