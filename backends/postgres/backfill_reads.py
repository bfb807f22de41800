"""Reading one back-fill chunk: the next rows of a table in key order (or the next ctid range
of a table without key) through COPY, as the open window of `Backfills` (see `backfill`);
or rows read again by key (`read_again`).

The reads adapt to what they find: a chunk's LIMIT to the memory its rows hold
(`copy.limit_for`, `copy.held_per_row`), the pages of a ctid range to the rows they held
(`_adapt_pages`).
"""

from __future__ import annotations

import itertools
import uuid

import psycopg
from psycopg import sql

from changefeed.backends.postgres.chunks import (
    ChunkWindow,
    Leaf,
    TableBackfill,
    next_ctid_chunk,
    pages_for,
    parse_tid,
)
from changefeed.backends.postgres.copy import CopiedChunk, CopyReader, copy_shape, limit_for


def read_chunk(
    conn: psycopg.Connection, backfill: TableBackfill, reader: CopyReader, *, chunk_size: int,
    chunk_bytes: int, lines: bool = False, keys_json: bool = True,
) -> ChunkWindow:
    """The next chunk of ``backfill`` as an open window (its watermark not written yet): at
    most ``chunk_size`` rows, holding about ``chunk_bytes`` of memory at most; ``lines``: read
    as JSON for the direct path (`CopyParser.read_lines`, with its keys' JSON if
    ``keys_json``)."""
    if backfill.estimate == 0:
        backfill.estimate = _estimate(conn, backfill.source)
    shape = copy_shape(conn, backfill.oid, backfill.table, backfill.key, backfill.source)
    size = chunk_size
    # COPY cannot stop after a number of bytes: the LIMIT keeps a chunk to its budget, by the
    # memory a row held in the last chunk; the cut at the budget (in COPY text, by the share
    # of it a row's text was) is the safety net when rows grow.
    limit = limit_for(size, chunk_bytes, backfill.row_bytes)
    copy_bytes = max(1, int(chunk_bytes * backfill.copy_share))
    watermark = uuid.uuid4().hex
    if backfill.by_ctid:
        leaves = _leaves(conn, backfill.source)
        wanted = range_rows(limit)
        pages = backfill.pages or pages_for(
            max((leaf.rows_per_page for leaf in leaves), default=0.0), wanted)
        chunk = next_ctid_chunk(backfill, leaves, pages)
        if chunk is None:  # every leaf read
            return ChunkWindow(backfill, watermark, {}, backfill.after, complete=True,
                               storage=backfill.storage, version=shape.schema_version)
        # A range is read whole, unsorted, as cheaply as COPY scans the table; only one holding
        # more than a chunk is read again, its first rows in ctid order, so that the chunk ends
        # at a ctid (pages are sized to make that rare). A range starting inside a page follows
        # such a chunk: it is read in ctid order at once.
        def read_range(rows: int | None) -> CopiedChunk:
            query = backfill.ctid_query(chunk.leaf.name, shape.columns, chunk.after,
                                        chunk.upper, rows)
            return reader(conn, query, shape, limit=limit, max_bytes=copy_bytes, lines=lines,
                          keys_json=keys_json)

        from_page_start = parse_tid(chunk.after)[1] == 0
        copied = read_range(None) if from_page_start else None
        if copied is None or not copied.ended:
            copied = read_range(limit)
        _measured(backfill, copied)
        got, ended, last = copied.rows, copied.ended, copied.last_key
        whole = ended and len(got) < size  # the page range is read to its end
        leaf = str(chunk.leaf.oid)
        last_key = [leaf, f"({chunk.upper},0)"] if whole else [leaf, last]
        backfill.pages = _adapt_pages(pages, len(got), wanted, whole, from_page_start)
        complete = whole and chunk.last and chunk.upper >= chunk.leaf.pages
        storage = chunk.leaf.storage
    else:
        query = backfill.chunk_query(sql.SQL(shape.source), shape.columns, limit,
                                     shape.cast_keys)
        copied = reader(conn, query, shape, limit=limit, max_bytes=copy_bytes, lines=lines,
                        keys_json=keys_json)
        _measured(backfill, copied)
        got, ended, last = copied.rows, copied.ended, copied.last_key
        last_key = last if len(got) else backfill.after
        complete = ended and len(got) < size
        storage = None
    return ChunkWindow(backfill, watermark, got, last_key, complete=complete, storage=storage,
                       version=shape.schema_version, lines=copied.lines)


REREAD_KEYS = 1000
"""Rows read again by key in one window at most (`read_again`)."""


def read_again(
    conn: psycopg.Connection, backfill: TableBackfill, reader: CopyReader, *, chunk_bytes: int,
) -> ChunkWindow:
    """The rows of (at most `REREAD_KEYS` of) ``backfill.reread`` as an open window, read by
    key (with the stream's loaders, as Python rows: they are few). Keys a read cut at its
    budget did not reach stay in ``backfill.reread`` for the next."""
    shape = copy_shape(conn, backfill.oid, backfill.table, backfill.key, backfill.source)
    tokens = list(itertools.islice(backfill.reread, REREAD_KEYS))
    query = backfill.keys_query(sql.SQL(shape.source), shape.columns,
                                [backfill.reread[token] for token in tokens], shape.cast_keys)
    copied = reader(conn, query, shape, limit=len(tokens) + 1, max_bytes=chunk_bytes)
    if not copied.ended:  # cut: only the keys of the rows read are done
        tokens = [backfill.token(row) for row in copied.rows]
    return ChunkWindow(backfill, uuid.uuid4().hex, copied.rows, backfill.after,
                       complete=backfill.complete_after_reread, version=shape.schema_version,
                       rereads=tuple(tokens))


def _measured(backfill: TableBackfill, copied: CopiedChunk) -> None:
    """Learn the size of ``backfill``'s rows from the chunk just read (if it had rows): the
    memory a row holds, and the share of it its COPY text is."""
    held = copied.held_size
    if held > 0:
        backfill.row_bytes = held
        backfill.copy_share = min(1.0, copied.row_size / held)


RANGE_SHARE = 0.75
"""The share of a chunk's rows a ctid range is sized to hold: rows per page vary, and a range
holding more than a chunk is read twice (`read_chunk`)."""


def range_rows(limit: int) -> int:
    """The rows a ctid range is sized to hold, for chunks of at most ``limit`` rows."""
    return max(1, int(limit * RANGE_SHARE))


def _adapt_pages(pages: int, found: int, size: int, whole: bool, from_page_start: bool) -> int:
    """Pages for the next ctid range of a table, sized to hold at most about ``size`` rows by
    the rows a page held in the last range read whole from a page's start: more when it held
    fewer (at most 8 times more at once), fewer when a range held more than a chunk (it was
    read twice)."""
    if not whole:
        return max(1, pages * 3 // 4)
    if found == 0:
        return min(pages * 8, 1 << 20)
    if not from_page_start:  # its first page was read in part: no measure of a page's rows
        return pages
    return max(1, min(pages * 8, int(size * pages / found)))


def _identifier(conn: psycopg.Connection, oid: int) -> sql.Composable:
    """Relation ``oid`` as SQL (its current name)."""
    row = conn.execute("SELECT %s::oid::regclass::text", [oid]).fetchone()
    return sql.SQL(row[0]) if row else sql.SQL(str(oid))


def _leaves(conn: psycopg.Connection, oid: int) -> list[Leaf]:
    """The relations with storage of table ``oid`` (itself, or its leaf partitions), in OID
    order, with their size in pages now."""
    rows = conn.execute(
        "SELECT c.oid::bigint, n.nspname, c.relname, c.relfilenode::bigint,"
        " (pg_relation_size(c.oid) / current_setting('block_size')::int)::bigint,"
        " CASE WHEN c.relpages > 0 AND c.reltuples > 0"
        "   THEN c.reltuples / c.relpages ELSE 0 END"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND (c.oid = %s"
        "   OR c.oid IN (SELECT relid FROM pg_partition_tree(%s) WHERE isleaf))"
        " ORDER BY c.oid", [oid, oid],
    ).fetchall()
    return [Leaf(row[0], sql.Identifier(row[1], row[2]), row[3], row[4], float(row[5]))
            for row in rows]


def _estimate(conn: psycopg.Connection, oid: int) -> int:
    """Rows in the table (and its partitions) by the statistics; counted when never analysed."""
    row = conn.execute(
        "SELECT CASE WHEN min(c.reltuples) < 0 THEN NULL ELSE sum(c.reltuples) END::bigint"
        " FROM pg_class c WHERE c.relkind = 'r' AND (c.oid = %s"
        " OR c.oid IN (SELECT relid FROM pg_partition_tree(%s) WHERE isleaf))",
        [oid, oid],
    ).fetchone()
    if row is not None and row[0] is not None:
        return int(row[0])
    counted = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(_identifier(conn, oid))).fetchone()
    return int(counted[0]) if counted else 0
