"""A chunk of a table with a key is read in two halves at once, on the feed's connection and a
helper's (`backfill_reads._read_in_two`), on a real server: the halves join into exactly the
chunk one query reads, and when they cannot join (the first half changed between the two
statements, the helper's connection died or was refused) the chunk is the first half alone and
the snapshot still delivers every row once."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
import pytest
from feeds import drain, make_feed

from changefeed import Operation
from changefeed._speedups import kernels
from changefeed.backends.postgres import backfill_reads
from changefeed.backends.postgres.backfill import Backfills, key_types
from changefeed.backends.postgres.backfill_reads import ChunkHelper, read_chunk
from changefeed.backends.postgres.chunks import TableBackfill
from changefeed.backends.postgres.connection import connect
from changefeed.backends.postgres.copy import CopyReader
from changefeed.backends.postgres.tables import WatchedTables

TABLES = {
    "int": ("id int PRIMARY KEY, v text",
            "SELECT g, 'v' || g FROM generate_series(1, %s) g"),
    "text": ("id text PRIMARY KEY, v int",
             "SELECT 'k' || chr(9) || g || E'\\\\n\\u00e9\\r', g FROM generate_series(1, %s) g"),
    "uuid": ("id uuid PRIMARY KEY, v int",
             "SELECT md5(g::text)::uuid, g FROM generate_series(1, %s) g"),
    "composite": ("a int, b text, v numeric, PRIMARY KEY (a, b)",
                  "SELECT g %% 7, 'b' || g, g * 1.5 FROM generate_series(1, %s) g"),
}


def make_table(pg: psycopg.Connection, kind: str, rows: int) -> TableBackfill:
    columns, select = TABLES[kind]
    pg.execute(f"CREATE TABLE t ({columns})")
    pg.execute(f"INSERT INTO t {select}", [rows])
    oid = pg.execute("SELECT 't'::regclass::oid::bigint").fetchone()[0]
    key = ["a", "b"] if kind == "composite" else ["id"]
    return TableBackfill(oid, "public.t", key, key_types(pg, oid, key))


def read_all(conn: psycopg.Connection, backfill: TableBackfill, *, size: int, lines: bool,
             helper: ChunkHelper | None) -> list[tuple[list[Any], Any]]:
    """Every chunk of ``backfill`` to the end: (its rows, as JSON lines or dicts, its last
    key)."""
    reader = CopyReader()
    chunks = []
    while True:
        window = read_chunk(conn, backfill, reader, chunk_size=size, chunk_bytes=1 << 30,
                            lines=lines, helper=helper)
        rows = window.rows
        if lines:
            rows = (rows.lines(range(len(rows)), "delta", None, "t", None, 0, 0).lines()
                    if len(rows) else [])
        chunks.append((list(rows), window.last_key))
        if window.complete:
            return chunks
        backfill.after = window.last_key


@pytest.fixture
def halves(monkeypatch) -> list[int]:
    """The LIMIT of each chunk read in two."""
    seen: list[int] = []
    read_in_two = backfill_reads._read_in_two

    def recording(read_keys, backfill, conn, reader, helper, limit, copy_bytes):
        seen.append(limit)
        return read_in_two(read_keys, backfill, conn, reader, helper, limit, copy_bytes)

    monkeypatch.setattr(backfill_reads, "_read_in_two", recording)
    return seen


@pytest.mark.parametrize("kind", list(TABLES))
@pytest.mark.parametrize("lines", [True, False], ids=["lines", "dicts"])
@pytest.mark.parametrize("size", [2, 7, 100])
def test_a_chunk_read_in_two_is_the_chunk_read_whole(pg, pg_dsn, halves, kind, lines, size):
    if lines and kernels is None:
        pytest.skip("the direct path needs the extension")
    backfill = make_table(pg, kind, 1000)
    whole = read_all(pg, backfill, size=size, lines=lines, helper=None)
    assert not halves
    backfill.after = None
    with connect(pg_dsn) as other:
        in_two = read_all(pg, backfill, size=size, lines=lines,
                          helper=ChunkHelper(other, CopyReader()))
    assert in_two == whole
    assert sum(len(rows) for rows, _ in whole) == 1000
    assert len(halves) == len(whole) and set(halves) == {size}  # every chunk read in two


class Between:
    """`_read_in_two`'s reads, the second made to wait until the first has read its rows,
    with ``meanwhile`` run on another connection in between."""

    def __init__(self, pg: psycopg.Connection, backfill: TableBackfill, meanwhile: str,
                 lines: bool) -> None:
        self.pg, self.backfill, self.meanwhile, self.lines = pg, backfill, meanwhile, lines
        self.first_read = threading.Event()
        self.shape = backfill_reads.copy_shape(pg, backfill.oid, backfill.table, backfill.key)

    def __call__(self, connection, read, rows, skip, budget):
        if skip:
            assert self.first_read.wait(10)
            self.pg.execute(self.meanwhile)
        query = self.backfill.chunk_query(psycopg.sql.SQL(self.shape.source),
                                          self.shape.columns, rows, self.shape.cast_keys, skip)
        copied = read(connection, query, self.shape, limit=rows, max_bytes=1 << 30,
                      lines=self.lines)
        if not skip:
            self.first_read.set()
        return copied


def ids_of(copied, lines: bool) -> list[int]:
    if lines:
        return [token[0] for token in copied.rows.tokens(0, len(copied.rows))]
    return [row["id"] for row in copied.rows]


@pytest.mark.parametrize("lines", [True, False] if kernels else [False],
                         ids=["lines", "dicts"][:2 if kernels else 1])
@pytest.mark.parametrize("meanwhile, joined", [
    ("DELETE FROM t WHERE id = 3", False),  # the second half starts a row later: a gap
    ("INSERT INTO t VALUES (-1, 'new')", False),  # a row earlier
    ("UPDATE t SET v = 'changed' WHERE id = 3", True),  # no row moves: they meet
    ("DELETE FROM t WHERE id = 30", True),  # after the first half: they meet
])
def test_halves_that_do_not_meet_leave_the_second_out(pg, pg_dsn, lines, meanwhile, joined):
    backfill = make_table(pg, "int", 100)
    between = Between(pg, backfill, meanwhile, lines)
    with connect(pg_dsn) as other:
        copied = backfill_reads._read_in_two(between, backfill, pg, CopyReader(),
                                             ChunkHelper(other, CopyReader()), 20, 1 << 30)
    ids = ids_of(copied, lines)
    if joined:
        assert ids == [i for i in range(1, 21) if i != 30 or "30" not in meanwhile]
        assert copied.last_key == ["20"]
    else:  # the first half, read before the change: its ten rows, and the next chunk after it
        assert ids == list(range(1, 11))
        assert copied.last_key == ["10"]
    assert not copied.ended


def test_a_helper_that_died_costs_its_half_only(pg, pg_dsn):
    backfill = make_table(pg, "int", 100)
    backfills = Backfills("s", WatchedTables(), lambda: pg, chunk_size=20, markers=False,
                          save=lambda states: None, connect=lambda: connect(pg_dsn))
    helper = backfills.helper()
    assert helper is not None and backfills.helper() is helper  # kept while it works
    pg.execute("SELECT pg_terminate_backend(%s)", [helper.conn.info.backend_pid])
    reader = CopyReader()
    backfill.row_bytes = 100.0  # past the probe: chunks of 20 rows
    window = read_chunk(pg, backfill, reader, chunk_size=20, chunk_bytes=1 << 30,
                        helper=helper)
    assert [row["id"] for row in window.rows] == list(range(1, 11))
    assert helper.conn.closed
    fresh = backfills.helper()  # the next chunk has a new one
    assert fresh is not None and fresh is not helper and not fresh.conn.closed
    backfill.after = window.last_key
    window = read_chunk(pg, backfill, reader, chunk_size=20, chunk_bytes=1 << 30,
                        helper=fresh)
    assert [row["id"] for row in window.rows] == list(range(11, 31))
    backfills.close()
    assert fresh.conn.closed


def test_a_refused_helper_reads_on_one_connection(pg, pg_dsn, caplog):
    """A role at its connection limit (a connection held here and the feed's plain one; the
    walsender is not counted): the helper's is refused, one warning says so, and the snapshot
    is read a chunk per query, every row once."""
    pg.execute("CREATE ROLE limited LOGIN REPLICATION CONNECTION LIMIT 2")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g")
    pg.execute("ALTER TABLE t OWNER TO limited")
    database = pg.info.dbname
    pg.execute(f"GRANT CREATE ON DATABASE {database} TO limited")
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, user="limited")
    with psycopg.connect(dsn) as holding:  # one of the three taken
        assert holding.execute("SELECT 1").fetchone() == (1,)
        feed = make_feed(dsn, "t", prefeed="snapshot", chunk_size=500,
                         operation=Operation.INSERT)
        with caplog.at_level(logging.WARNING, logger="changefeed.postgres"):
            got = drain(feed, close=True)
    assert sorted(change.new["id"] for change in got) == list(range(1, 3001))
    refused = [record for record in caplog.records if "a second was refused" in record.message]
    assert len(refused) == 1


def test_the_helper_is_closed_when_the_snapshot_is_done(pg, pg_dsn, halves, monkeypatch):
    opened: list[int] = []
    helper = Backfills.helper

    def recording(self):
        made = helper(self)
        if made is not None:
            opened.append(made.conn.info.backend_pid)
        return made

    monkeypatch.setattr(Backfills, "helper", recording)
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5000) g")
    feed = make_feed(pg_dsn, "t", prefeed="snapshot", chunk_size=700)
    seen = set()
    alive = None
    try:
        for change in feed.changes(timeout=30):
            feed.ack(change.position)
            seen.add(change.new["id"])
            if len(seen) == 5000:  # the snapshot's last row: a change from the stream next
                pg.execute("INSERT INTO t VALUES (0, 'after')")
            elif change.new["id"] == 0:  # still streaming: the helper's backend is gone
                alive = gone(pg, opened)
                break
    finally:
        feed.close()
    assert seen == set(range(0, 5001)) and halves and opened  # the chunks were read in two
    assert alive == 0


def gone(pg: psycopg.Connection, pids: list[int]) -> int:
    """How many of the backends ``pids`` are still there once they had time to end (a backend
    ends right after its client closes the connection: asked until none is left)."""
    for _ in range(200):
        alive = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                           [pids]).fetchone()[0]
        if not alive:
            return 0
        pg.execute("SELECT pg_sleep(0.01)")
    return int(alive)
