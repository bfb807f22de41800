"""A table without key is snapshotted in page ranges (by ctid), on a real server: a range is read
whole with no sort, and only one holding more than a chunk is read again, its first rows in ctid
order. Every row comes exactly once either way."""

from __future__ import annotations

import re
from typing import Any

import pytest
from feeds import drain, make_feed
from psycopg import sql

from changefeed import Operation
from changefeed.backends.postgres.chunks import TableBackfill
from changefeed.backends.postgres.copy import CopyReader

ORDERED = "ORDER BY t.ctid"


@pytest.fixture
def queries(monkeypatch) -> list[str]:
    """The chunk queries the snapshot sends, as text."""
    sent: list[str] = []
    call = CopyReader.__call__

    def recording(self, conn, query, *args, **kwargs):
        sent.append(query.as_string(conn))
        return call(self, conn, query, *args, **kwargs)

    monkeypatch.setattr(CopyReader, "__call__", recording)
    return sent


def snapshot_ids(pg_dsn: str, table: str, chunk_size: int) -> list[int]:
    feed = make_feed(pg_dsn, table, prefeed="snapshot", chunk_size=chunk_size,
                     operation=Operation.INSERT)
    got = drain(feed, close=True)
    assert all(change.snapshot for change in got)
    return [change.new["id"] for change in got]


def test_a_whole_range_is_a_tid_range_scan_without_a_sort(pg):
    pg.execute("CREATE TABLE k (id int NOT NULL, pad text)")
    pg.execute("INSERT INTO k SELECT g, 'row ' || g FROM generate_series(1, 50000) g")
    pg.execute("ANALYZE k")
    backfill = TableBackfill(0, "public.k", [], [])
    whole = backfill.ctid_query(sql.Identifier("public", "k"), ["id", "pad"], "(0,0)", 100,
                                None)
    plan = "\n".join(row[0] for row in pg.execute("EXPLAIN " + whole.as_string(pg)))
    assert "Tid Range Scan" in plan and "Sort" not in plan, plan


@pytest.mark.parametrize("rows, chunk_size", [(3000, 500), (20000, 1000), (5000, 250)])
def test_ranges_that_fit_are_read_once_and_unsorted(pg_dsn, pg, queries, rows, chunk_size):
    pg.execute("CREATE TABLE k (id int NOT NULL, pad text)")
    pg.execute("INSERT INTO k SELECT g, 'row ' || g FROM generate_series(1, %s) g", [rows])
    assert sorted(snapshot_ids(pg_dsn, "k", chunk_size)) == list(range(1, rows + 1))
    reads = [query for query in queries if "FROM ONLY" in query]
    again = [query for query in reads if ORDERED in query]
    # Rows of one size: once the first ranges told how many a page holds, ranges fit.
    assert len(reads) - len(again) >= 2 * len(again), reads


@pytest.mark.parametrize("chunk_size", [300, 1000])
def test_ranges_holding_more_than_a_chunk_are_read_again_in_ctid_order(
        pg_dsn, pg, queries, chunk_size):
    # The first half of the table's pages keep 1 row in 25 (deleted, never vacuumed), the
    # second all of theirs: ranges sized by the sparse half hold many chunks in the dense one.
    pg.execute("CREATE TABLE k (id int NOT NULL, pad text) WITH (autovacuum_enabled = off)")
    pg.execute("INSERT INTO k SELECT g, 'row ' || g FROM generate_series(1, 40000) g")
    pg.execute("DELETE FROM k WHERE id <= 20000 AND id % 25 <> 0")
    expected = sorted(row[0] for row in pg.execute("SELECT id FROM k"))
    got = snapshot_ids(pg_dsn, "k", chunk_size)
    assert len(got) == len(expected) and sorted(got) == expected
    reads = [query for query in queries if "FROM ONLY" in query]
    again = [query for query in reads if ORDERED in query]
    assert again and len(again) < len(reads), reads
    # An ordered read replaces the unsorted read of the same range just before it, or goes
    # on inside a page after a chunk that ended there.
    replaced = 0
    for index, query in enumerate(reads):
        if ORDERED not in query:
            continue
        if reads[index - 1] == query.split(" ORDER BY")[0]:
            replaced += 1
        else:
            assert re.search(r"ctid > '\(\d+,[1-9]\d*\)'", query), query
    assert replaced, reads


def test_chunks_smaller_than_a_page_try_one_unsorted_read_a_page_at_most(pg_dsn, pg, queries):
    pg.execute("CREATE TABLE k (id int NOT NULL, pad text)")
    pg.execute("INSERT INTO k SELECT g, 'row ' || g FROM generate_series(1, 3000) g")
    (pages,) = pg.execute("SELECT pg_relation_size('k') / 8192").fetchone()
    assert sorted(snapshot_ids(pg_dsn, "k", 7)) == list(range(1, 3001))
    reads = [query for query in queries if "FROM ONLY" in query]
    unsorted = [query for query in reads if ORDERED not in query]
    assert len(unsorted) <= pages + 1 and len(reads) - len(unsorted) >= 3000 // 7, unsorted


def test_a_snapshot_cut_short_in_a_range_read_again_goes_on_after_its_last_row(pg_dsn, pg):
    pg.execute("CREATE TABLE k (id int NOT NULL)")
    pg.execute("INSERT INTO k SELECT generate_series(1, 600)")  # 2-3 pages, chunks of 50 rows
    first: list[Any] = []
    feed = make_feed(pg_dsn, "k", prefeed="snapshot", chunk_size=50, operation=Operation.INSERT)
    for change in feed.changes(limit=100):  # two chunks delivered, then the process dies
        first.append(change.new["id"])
        feed.ack(change.position)
    feed.close()
    rest = snapshot_ids(pg_dsn, "k", 50)
    assert first == list(range(1, 101))  # the ordered re-reads: ctid order
    assert sorted(first + rest) == list(range(1, 601))
