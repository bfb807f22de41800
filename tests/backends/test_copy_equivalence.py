"""Back-fill chunks read through COPY give exactly the rows the cursor path gave.

A real PostgreSQL holds a row of every value family of the README's Values table (NULLs, text
with tabs, newlines, backslashes and control characters, arrays of several dimensions, domains,
enums, composites, ranges and multiranges, NaN and Infinity, BC and infinite dates, ``24:00``,
intervals, json with exact numbers and deep nesting, bytea, inet/cidr, money, geometric and
text-only types) and random rows. Each table's chunk queries are read three ways: through a
cursor with `load_result` (the path before COPY), through COPY parsed by the pure-Python
`RowParser`, and through COPY parsed by the compiled `CopyParser`; every row must be the same,
value for value and type for type, and so must every output line made of them. COPY's text
escapes are also checked on their own, including the octal and hex escapes PostgreSQL reads
but does not write.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from clitools import run_cli
from equivalence import random_rows, same
from psycopg import sql
from testservers import drop_database

from changefeed import _speedups
from changefeed.backends.postgres import connection
from changefeed.backends.postgres.backfill import key_types
from changefeed.backends.postgres.backfill_reads import read_chunk
from changefeed.backends.postgres.chunks import (
    START_TID,
    ChunkWindow,
    TableBackfill,
    window_changes,
    window_lines,
)
from changefeed.backends.postgres.copy import (
    PROBE_ROWS,
    CopyReader,
    CopyShape,
    RowParser,
    copy_fields,
    copy_shape,
)
from changefeed.backends.postgres.loading import TypeLoaders, psycopg_loaders, query_rows
from changefeed.backends.postgres.snapshot import schema_version_of
from changefeed.backends.postgres.tables import stream_columns
from changefeed.change import Change, Operation
from changefeed.errors import DecodeError
from changefeed.formats.change_dict import change_line
from changefeed.formats.delta import delta_line_encoder

pytestmark = pytest.mark.postgres

kernels = _speedups.kernels
if kernels is None and _speedups._requested != "python":
    pytest.fail("the compiled extension is not built (pip install -e . with a C compiler)",
                pytrace=False)
compiled_only = pytest.mark.skipif(kernels is None, reason="CHANGEFEED_IMPL=python")

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE DOMAIN label AS text;
CREATE TYPE pair AS (a int, b text);
CREATE TYPE nested AS (p pair, at timestamptz, xs float8[]);
CREATE TYPE floatrange AS RANGE (subtype = float8);
CREATE TABLE scalars (
    id serial PRIMARY KEY, i2 int2, i4 int4, i8 int8, o oid, n numeric, n2 numeric(12, 2),
    f4 float4, f8 float8, flag bool, t text, vc varchar(20), c char(5), nm name, ch "char",
    bin bytea, u uuid, d date, ts timestamp, tz timestamptz, tm time, ttz timetz,
    iv interval, j json, jb jsonb
);
CREATE TABLE kinds (
    id int PRIMARY KEY, ia int[], ta text[], t2 text[][], fa float8[], da date[], na numeric[],
    ua uuid[], ja jsonb[], tza timestamptz[], m mood, ma mood[], pos positive, lb label,
    pr pair, ns nested, pra pair[], ir int4range, tr tstzrange, fr floatrange, dr daterange,
    mr int4multirange, inet_v inet, cidr_v cidr, mo money, mac macaddr, pt point, bx box,
    pa path, pg polygon, ci circle, bits bit(4), vb varbit, x xml, tsv tsvector, lsn pg_lsn,
    m8 macaddr8, ln line, ls lseg, tq tsquery
);
CREATE TABLE keyless (a int, b text, c jsonb);
CREATE TABLE "Mixed Case" (k text, n int, "v\tw" text, PRIMARY KEY (k, n));
CREATE TABLE generated (id int PRIMARY KEY, a int, doubled int GENERATED ALWAYS AS (a * 2)
    STORED, gone text);
ALTER TABLE generated DROP COLUMN gone;
"""

ROWS = [
    """INSERT INTO scalars (i2, i4, i8, o, n, n2, f4, f8, flag, t, vc, c, nm, ch, bin, u, d, ts,
       tz, tm, ttz, iv, j, jb) VALUES (-32768, 2147483647, -9223372036854775808, 4294967295,
       '123456789012345678901234567890.000000000000000000001', 1234.5, 1.5, 0.1, true,
       E'tab\\there "quoted" \\\\ back\\\\slash ü 😀 \\u0001 \\b\\f\\v\\r\\n end\\\\N',
       E'a\\tb', 'ab', 'a name', E'\\t', '\\x00ff5c0a09', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
       '2024-02-29', '2024-01-02 03:04:05.5', '2024-01-02 03:04:05.123456+02',
       '23:59:59.999999', '12:00:00+02', '1 year 2 mons -3 days 04:05:06.789',
       '{"a": 1.0000000000000000001, "b": [1, 2e3, -0.5], "t": "x\\ty\\\\z", "a": "dup"}',
       '{"k": [true, false, null, "é\\n\\t\\\\"], "n": 123456789012345678901234567890}')""",
    "INSERT INTO scalars (id) VALUES (DEFAULT)",  # NULL everywhere
    # the text \N (not a NULL), an empty text, what Python cannot hold, the non-finite numbers
    """INSERT INTO scalars (n, f4, f8, d, ts, tz, tm, iv, j, t, vc) VALUES
       ('NaN', 'NaN', '-Infinity', '4713-01-01 BC', 'infinity', '10000-01-01 00:00:00+00',
        '24:00:00', '0', '[]', E'\\\\N', '')""",
    """INSERT INTO scalars (n, f4, f8, d, ts, tz, tm, iv, j) VALUES
       ('Infinity', 'Infinity', 'NaN', '-infinity', '0044-03-15 12:00:00 BC', '-infinity',
        '00:00:00', '-1 days -00:00:00.000001', '"just a string"')""",
    """INSERT INTO scalars (n, f8, d, ts, tz, tm, j, jb) VALUES
       ('-0.0000001', 1e308, '0001-01-01', '9999-12-31 23:59:59.999999',
        '0001-01-01 00:00:00+00', '00:00:00.000001',
        (SELECT repeat('[', 100) || repeat(']', 100))::json,
        (SELECT repeat('{"a":', 60) || '1.5' || repeat('}', 60))::jsonb)""",
    "INSERT INTO scalars (j) VALUES ((SELECT repeat('[', 3000) || repeat(']', 3000))::json)",
    # a lone surrogate escaped in json (UTF-8 cannot hold it), a year after 9999
    """INSERT INTO scalars (j, d, ts) VALUES ('["\\ud800", "x\\u0000y"]', '10000-01-01',
       '12345-06-07 08:09:10')""",
    "INSERT INTO scalars (jb) VALUES (('[' || repeat('9', 5000) || ']')::jsonb)",
    """INSERT INTO kinds VALUES (1, '{1,NULL,3}', ARRAY['a,b', 'c"d', NULL, 'NULL', E'e\\tf',
       E'g\\\\h', E'i\\nj'], '{{a,b},{c,d}}', '{NaN,1e308,-Infinity}', '{2024-02-29,infinity,NULL}',
       '{1.50,NaN}', ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[],
       ARRAY[E'{"a":1.5,"t":"\\\\t"}']::jsonb[],
       ARRAY['2024-01-02 03:04:05+00', '-infinity']::timestamptz[], 'happy', '{sad,ok}', 7,
       E'lab\\tel', ROW(1, E'x\\ty'), ROW(ROW(2, 'y,z'), '2024-01-02 03:04:05+00', '{1.5,NaN}'),
       ARRAY[ROW(3, 'q')::pair, NULL], '[1,5)', '[2024-01-01 00:00:00+00,)', '(1.5,2.5]',
       'empty', '{[1,3), [5,7)}', '192.168.0.1/24', '10.0.0.0/8', '-1234567.89',
       '08:00:2b:01:02:03', '(1,2.5)', '((0,0),(1,1))', '[(0,0),(1,1),(2,0)]',
       '((0,0),(1,1),(2,0))', '<(1,1),2>', '1010', '10110', E'<a>b\\tc</a>', 'a cat sat',
       '16/B374D848', '08:00:2b:01:02:03:04:05', '{1,-1,0}', '[(0,0),(1,1)]', 'cat & !dog')""",
    "INSERT INTO kinds (id) VALUES (2)",
    """INSERT INTO kinds (id, ia, t2, inet_v, da, pr) VALUES (3, '{{1,2},{3,NULL}}',
       '{{{a}},{{NULL}}}', '::1', '{4713-01-01 BC}', ROW(NULL, NULL))""",
    """INSERT INTO keyless VALUES (1, E'a\\tb', '{"x": [1, 2.50]}'), (NULL, NULL, NULL),
       (1, E'a\\tb', '{"x": [1, 2.50]}'), (2, E'\\\\', 'null')""",
    """INSERT INTO "Mixed Case" VALUES (E'k\\t1', 1, E'v\\nw'), (E'k\\\\2', 2, NULL),
       ('k3', 3, E'\\\\N')""",
    "INSERT INTO generated (id, a) VALUES (1, 10), (2, NULL)",
]


TABLES = ["scalars", "kinds", "keyless", "Mixed Case", "generated"]


@pytest.fixture(scope="module")
def database(pg_server) -> Iterator[str]:
    name = "copy_equivalence"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = pg_server.dsn(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            for statement in ROWS:
                conn.execute(statement)
            for statement, params in random_rows(seed=21, count=400):
                conn.execute(statement, params)
            conn.execute("ANALYZE")
        yield dsn
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            drop_database(conn, name)  # and its slots




def backfill_of(conn: psycopg.Connection, table: str) -> tuple[TableBackfill, CopyShape]:
    oid, key = conn.execute(
        "SELECT c.oid::bigint, coalesce((SELECT array_agg(a.attname ORDER BY a.attnum)"
        " FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = c.oid AND i.indisprimary), '{}')"
        " FROM pg_class c WHERE c.oid = to_regclass(%s)", [f'"{table}"']).fetchone()
    backfill = TableBackfill(oid, f"public.{table}", list(key), key_types(conn, oid, key))
    return backfill, copy_shape(conn, oid, backfill.table, backfill.key)


def chunk_queries(conn: psycopg.Connection, table: str, size: int) -> Iterator[Any]:
    """The chunk queries of a back-fill of ``table`` (key order, or ctid ranges), each with
    its shape and the chunk's keys as ``::text`` gives them (None by ctid), until the table
    is read: chunks follow the last of those keys."""
    backfill, shape = backfill_of(conn, table)
    identifier = psycopg.sql.Identifier(table)
    if backfill.by_ctid:
        yield (backfill.ctid_query(identifier, shape.columns, START_TID, 1 << 20, 1 << 30),
               shape, None)
        return
    while True:
        query = backfill.chunk_query(identifier, shape.columns, size, shape.cast_keys)
        keys = text_keys(conn, backfill, identifier, size)
        yield query, shape, keys
        if len(keys) < size:
            return
        backfill.after = keys[-1]


def text_keys(conn: psycopg.Connection, backfill: TableBackfill, identifier: Any,
              size: int) -> list[list[str]]:
    """The keys of the next chunk of ``backfill`` as each key column's ``::text``: the text
    recorded before the key was read from the rows' own COPY fields (the reference)."""
    keys = [sql.Identifier(column) for column in backfill.key]
    query = sql.SQL("SELECT ARRAY[{}]::text[] FROM {} t").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in keys), identifier)
    if backfill.after is not None:
        query += sql.SQL(" WHERE ({}) > ({})").format(
            sql.SQL(", ").join(keys), sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(name))
                for value, name in zip(backfill.after, backfill.key_types, strict=True)))
    query += sql.SQL(" ORDER BY {} LIMIT {}").format(sql.SQL(", ").join(keys),
                                                     sql.Literal(size))
    return [row[0] for row in conn.execute(query).fetchall()]


def cursor_chunk(conn: psycopg.Connection, query: Any, keys: list[list[str]] | None,
                 loaders: TypeLoaders) -> tuple[list[dict[str, Any]], Any]:
    """A chunk's rows through a cursor (the path before COPY), without the leading key
    texts, and its last key as ``::text`` gives it (the ctid's, for a table without key)."""
    rows = query_rows(conn, query, loaders)
    if keys is None:
        want_key = rows[-1]["__changefeed_key"] if rows else None
    else:
        assert len(keys) == len(rows)
        want_key = keys[-1] if keys else None
    for row in rows:
        for name in [name for name in row if name.startswith("__changefeed_key")]:
            del row[name]
    return rows, want_key


def copy_lines(conn: psycopg.Connection, query: Any) -> list[bytes]:
    with conn.cursor() as cursor, cursor.copy(
            psycopg.sql.SQL("COPY ({}) TO STDOUT").format(query)) as copy:
        return [bytes(line) for line in copy]


@pytest.mark.parametrize("table", TABLES)
def test_copy_rows_are_the_cursor_paths_rows(database, table):
    """Every chunk of every table: the rows (and the last key) parsed from COPY by the
    pure-Python parser and by the compiled one are the cursor path's, value for value, and
    every line the delta and change encoders write of them is the same, byte for byte."""
    conn = connection.connect(database)
    loaders = psycopg_loaders(conn, catalog=conn)
    chunks = 0
    for query, shape, keys in chunk_queries(conn, table, size=97):
        chunks += 1
        cursor_rows, want_key = cursor_chunk(conn, query, keys, loaders)
        lines = copy_lines(conn, query)
        assert len(lines) == len(cursor_rows)
        parsers = [RowParser(shape, loaders)]
        if kernels is not None:
            parsers.append(kernels.CopyParser(shape, loaders))
        for parser in parsers:
            rows, raw_key = parser.rows(lines)
            assert same(cursor_rows, rows), (type(parser), table)
            assert same(parser.key(raw_key), want_key)
            assert [encoded(row, shape) for row in rows] == [
                encoded(row, shape) for row in cursor_rows]
    assert chunks >= (5 if table == "scalars" else 1)


def encoded(row: dict[str, Any], shape: CopyShape) -> list[bytes]:
    """A snapshot row's delta and change lines, by the pure-Python encoders and, where built,
    the compiled ones (which must agree)."""
    change = Change(Operation.INSERT, shape.qualified_name, row, None,
                    {name: row[name] for name in shape.key_names} or dict(row), None, None,
                    None, True, None, None)
    pure_delta = getattr(delta_line_encoder, "python_factory", delta_line_encoder)
    lines = [pure_delta()(change), change_line(change)]
    if kernels is not None:
        assert [kernels.DeltaEncoder()(change), kernels.ChangeEncoder()(change)] == lines
    return lines


@pytest.mark.parametrize("table", TABLES)
def test_the_copy_reader_reads_each_chunk_whole(database, table):
    """`CopyReader` end to end (the implementation in use): the rows, whether the query
    ended, the last key; the connection stays usable after each chunk."""
    conn = connection.connect(database)
    loaders = psycopg_loaders(conn, catalog=conn)
    reader = CopyReader()
    for query, shape, keys in chunk_queries(conn, table, size=97):
        cursor_rows, want_key = cursor_chunk(conn, query, keys, loaders)
        chunk = reader(conn, query, shape, limit=97, max_bytes=1 << 30)
        assert chunk.ended == (len(cursor_rows) < 97 or shape.by_ctid)
        assert same(chunk.rows, cursor_rows)
        assert same(chunk.last_key, want_key)
        assert chunk.row_size > 0 or not cursor_rows
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_chunk_stops_at_its_byte_budget_and_the_connection_goes_on(database):
    """Rows bigger than the budget: the COPY is cut after the row that passes it (not
    ended), and the connection is idle again for the next statement."""
    conn = connection.connect(database)
    reader = CopyReader()
    query, shape, _ = next(chunk_queries(conn, "scalars", size=400))
    whole = reader(conn, query, shape, limit=400, max_bytes=1 << 30)
    cut = reader(conn, query, shape, limit=400, max_bytes=2000)
    assert whole.ended is False and len(whole.rows) == 400
    assert cut.ended is False and 0 < len(cut.rows) < 400
    assert same(cut.rows, whole.rows[:len(cut.rows)])
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.parametrize("lines", [False, True] if kernels is not None else [False])
def test_a_chunk_holds_about_its_byte_budget_of_memory(database, lines):
    """A table's first chunk is a probe of `PROBE_ROWS` rows; the next ones take as many rows
    as hold about the budget of memory (as dicts, or as JSON for the direct path), measured
    here by tracemalloc: neither far over the budget nor far under it."""
    conn = connection.connect(database)
    table = f"budget_{int(lines)}"
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, t text, n numeric)")
    conn.execute(f"INSERT INTO {table} SELECT g, repeat('x', g % 300), g * 1.5"
                 " FROM generate_series(1, 30000) g")
    backfill, _ = backfill_of(conn, table)
    reader = CopyReader()
    budget = 2 << 20
    first = read_chunk(conn, backfill, reader, chunk_size=10**6, chunk_bytes=budget,
                       lines=lines)
    assert first.count == PROBE_ROWS and backfill.row_bytes > 0
    backfill.after = first.last_key
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        window = read_chunk(conn, backfill, reader, chunk_size=10**6, chunk_bytes=budget,
                            lines=lines)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert PROBE_ROWS < window.count < 30000 - PROBE_ROWS
    assert budget / 2 < held < budget * 1.5, (held, window.count)


KEYED = {
    "k_int": ("id int PRIMARY KEY, v text", "SELECT g, 'v' || g FROM generate_series(1, 23) g"),
    "k_bigint": ("id bigint PRIMARY KEY", "SELECT g * 3000000000 FROM generate_series(-11, 11) g"),
    "k_text": ("v int, k text PRIMARY KEY",  # not the first column; escapes of every kind
               "SELECT g, CASE g % 5 WHEN 0 THEN E'a\\tb' WHEN 1 THEN E'c\\\\d' WHEN 2"
               " THEN E'e\\nf' WHEN 3 THEN E'\\\\N' ELSE '' END || g"
               " FROM generate_series(1, 23) g"),
    "k_uuid": ("id uuid PRIMARY KEY", "SELECT md5(g::text)::uuid FROM generate_series(1, 23) g"),
    "k_numeric": ("id numeric PRIMARY KEY",
                  "SELECT g / 7.0 * 1e10 FROM generate_series(-11, 11) g"),
    "k_float": ("id float8 PRIMARY KEY", "SELECT g / 10.0 FROM generate_series(1, 23) g"),
    "k_tz": ("id timestamptz PRIMARY KEY",
             "SELECT '2024-01-01 00:00:00.5+02'::timestamptz + g * interval '37 minutes'"
             " FROM generate_series(1, 23) g"),
    "k_bool": ("id bool, n int, PRIMARY KEY (id, n)",  # bool::text is 'true', COPY's 't'
               "SELECT g % 2 = 0, g FROM generate_series(1, 23) g"),
    "k_char": ("id char(6) PRIMARY KEY",  # ::text drops the padding COPY keeps
               "SELECT 'c' || g FROM generate_series(1, 23) g"),
    "k_inet": ("id inet PRIMARY KEY",  # ::text shows the /32 COPY leaves out
               "SELECT ('10.0.0.' || g)::inet FROM generate_series(1, 23) g"),
    "k_domain": ("id positive PRIMARY KEY", "SELECT g FROM generate_series(1, 23) g"),
    "k_composite": ("a text, b int, c text, PRIMARY KEY (c, b)",
                    "SELECT 'x', g % 4, E'c\\t' || g / 4 FROM generate_series(1, 23) g"),
    "k_named": ('"we""ird\tkey ü" text PRIMARY KEY, "select" int',
                "SELECT 'w' || g, g FROM generate_series(1, 23) g"),
    "k_generated": ("a int, id int GENERATED ALWAYS AS (a * 2) STORED PRIMARY KEY",
                    "SELECT g FROM generate_series(1, 23) g"),
}


@pytest.mark.parametrize("lines", [False, True] if kernels is not None else [False])
@pytest.mark.parametrize("table", list(KEYED))
def test_a_chunks_last_key_is_its_text_and_the_next_chunk_follows_it(database, table, lines):
    """The key of a chunk's last row, read from the COPY fields of its key columns (or their
    ``::text`` where that differs: bool, char(n), inet, a domain, a generated column), is the
    text ``::text`` gives, the text recorded before; read chunk after chunk, from it as
    recorded, and after a restart from it, every row comes exactly once."""
    conn = connection.connect(database)
    columns, rows = KEYED[table]
    name = f"{table}_{int(lines)}"
    conn.execute(f"CREATE TABLE {name} ({columns})")
    conn.execute(f"INSERT INTO {name} {rows}")
    backfill, shape = backfill_of(conn, name)
    identifier = sql.Identifier(name)
    want = text_keys(conn, backfill, identifier, 1 << 20)
    assert len(want) == 23
    reader = CopyReader()
    seen: list[list[str]] = []
    while True:
        keys = text_keys(conn, backfill, identifier, 4)
        window = read_chunk(conn, backfill, reader, chunk_size=4, chunk_bytes=1 << 20,
                            lines=lines)
        assert window.count == len(keys)
        assert window.last_key == (keys[-1] if keys else backfill.after)
        seen += keys
        if window.complete:
            break
        # Recorded as JSON, read back after a restart: the next chunk follows it.
        backfill = TableBackfill(backfill.oid, backfill.table, backfill.key,
                                 backfill.key_types, after=json.loads(json.dumps(
                                     window.last_key)))
    assert seen == want


def test_errors_of_the_chunk_query_are_psycopg_errors(database):
    """A table dropped between planning and reading: `UndefinedTable`, as the feed expects
    (it plans the chunk again); the connection goes on."""
    conn = connection.connect(database)
    conn.execute("CREATE TABLE doomed (id int PRIMARY KEY)")
    query, shape, _ = next(chunk_queries(conn, "doomed", size=10))
    conn.execute("DROP TABLE doomed")
    with pytest.raises(psycopg.errors.UndefinedTable):
        CopyReader()(conn, query, shape, limit=10, max_bytes=1 << 20)
    assert conn.execute("SELECT 3").fetchone() == (3,)


@pytest.mark.parametrize("table", TABLES)
def test_a_chunks_shape_is_the_streams(database, table):
    """`copy_shape` (one round trip): the columns pgoutput sends, their types, the schema
    version `schema_version_of` gives, and the relation's name as SQL."""
    conn = connection.connect(database)
    backfill, shape = backfill_of(conn, table)
    assert shape.schema_version == schema_version_of(conn, backfill.oid)
    assert list(shape.columns) == stream_columns(conn, backfill.oid)
    assert shape.source == conn.execute("SELECT %s::oid::regclass::text",
                                        [backfill.oid]).fetchone()[0]
    assert [shape.columns[i] for i in shape.key_indexes] == (backfill.key or list(shape.columns))


def test_a_chunk_waiting_for_a_lock_lets_the_processs_other_threads_run(database):
    """The COPY waits for the server outside libpq (select() releases the GIL): another thread
    of the process, here the one holding the lock the chunk waits for, goes on and commits.
    (Waiting inside libpq with the GIL held hung until the lock timeout.)"""
    conn = connection.connect(database)
    conn.execute("SET lock_timeout = '60s'")
    query, shape, _ = next(chunk_queries(conn, "kinds", size=10))
    holder = psycopg.connect(database, autocommit=True)
    watcher = psycopg.connect(database, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE kinds")
    reader_pid = conn.info.backend_pid

    def release_once_the_reader_waits() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = watcher.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                  [reader_pid]).fetchone()
            if row and row[0] == "Lock":
                break
            time.sleep(0.01)
        holder.execute("COMMIT")

    thread = threading.Thread(target=release_once_the_reader_waits)
    thread.start()
    for attempt in ("waiting", "again"):  # the second read takes the lock at once
        chunk = CopyReader()(conn, query, shape, limit=10, max_bytes=1 << 20)
        assert len(chunk.rows) == 3 and chunk.ended, attempt
    thread.join()
    holder.close()
    watcher.close()


# -- the direct path: chunks as ready lines ----------------------------------------------------

MODELS = {"public.scalars": "Scalar \"quoted\"", "*": "Other"}


@compiled_only
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("fmt,model", [("delta", None), ("delta", MODELS), ("change", None)])
def test_chunk_lines_are_the_lines_of_the_chunks_changes(database, table, fmt, model):
    """`CopyParser.read_lines` and `window_lines` (``changefeed run`` without stages): each
    chunk's `Lines` hold, byte for byte and at the same positions, the lines the pure-Python
    encoders write of the changes `window_changes` makes of the rows the pure parser reads;
    the same rows by key token; with rows taken out by the stream, markers, a schema
    version."""
    conn = connection.connect(database)
    loaders = psycopg_loaders(conn, catalog=conn)
    pure_delta = getattr(delta_line_encoder, "python_factory", delta_line_encoder)
    encode = pure_delta(model) if fmt == "delta" else change_line
    rng = random.Random(table)
    for number, (query, shape, _) in enumerate(chunk_queries(conn, table, size=97)):
        lines = copy_lines(conn, query)
        rows, raw_key = RowParser(shape, loaders).rows(lines)
        keys_json = fmt != "delta" or number % 2 == 0  # the delta lines need no key JSON
        copied, lines_key = kernels.CopyParser(shape, loaders).lines_of(lines, keys_json)
        assert lines_key == raw_key and len(copied) == len(rows)
        backfill, _ = backfill_of(conn, table)
        backfill.announced = number > 0
        assert copied.tokens(0, len(rows)) == [backfill.token(row) for row in rows]
        # Rows without key may repeat: a token's indexes are then a list, as in Python's.
        assert copied.by_token() == ChunkWindow(backfill, "w", rows, None, False)._indexed()
        complete = len(rows) < 97
        windows = (ChunkWindow(backfill, "w", rows, None, complete),
                   ChunkWindow(backfill, "w", copied, None, complete, lines=True))
        for row in rng.sample(rows, len(rows) // 4):  # changed by the stream
            for window in windows:
                window.drop(backfill.token(row))
        assert windows[0].kept() == windows[1].kept() and windows[1].count == len(
            windows[1].kept())
        version = "v1" if number % 2 else None
        changes, last = window_changes(windows[0], backfill.table, version,
                                       positions(7 + number), markers=True)
        backfill.announced = number > 0
        batch = (5, 7, 1000)[number % 3]  # batches of lines: several, or one per chunk
        items, last_of_lines = window_lines(windows[1], backfill.table, version,
                                            positions(7 + number), markers=True, fmt=fmt,
                                            model=model, batch=batch)
        assert last_of_lines == last
        want = [encode(c) if c.__class__ is Change else c for c in changes]
        got: list[Any] = []
        got_positions = []
        for item in items:
            if item.__class__ is _speedups.Lines:
                assert 0 < item.count <= batch
                assert item.position == item.positions()[-1] and item.committed_at is None
                got_positions += item.positions()
                got += item.lines()
            else:
                got.append(item)
        assert got == want
        assert got_positions == [c.position for c in changes if c.__class__ is Change]


def positions(lsn: int) -> Any:
    """A transaction's `next_position` (as the decoder gives one)."""
    from changefeed.backends.postgres.position import PgPosition

    index = iter(range(1 << 20))
    return lambda: PgPosition(lsn << 24, next(index))


@compiled_only
@pytest.mark.parametrize("fmt", ["delta", "change"])
def test_a_snapshot_through_the_direct_path_writes_the_pure_paths_lines(database, fmt, tmp_path):
    """``changefeed run --prefeed snapshot`` without stages, compiled (chunks as `Lines`) and
    pure: the same output, byte for byte, chunk after chunk of every table (without key: by
    ctid ranges)."""
    outputs = {}
    for implementation in ("c", "python"):
        slot = f"copy_lines_{fmt}_{implementation}"
        result = run_cli(
            "run", "scalars", "kinds", '"Mixed Case"', "generated", "keyless", "--url", database,
            "--slot", slot, "--ops", "insert",  # (no identity on keyless: inserts only)
            "--prefeed", "snapshot", "--chunk-size", "61", "--format", fmt,
            "--until-idle", "1", "--quiet", "--checkpoint", str(tmp_path / slot),
            env={"CHANGEFEED_IMPL": implementation})
        assert result.returncode == 0, result.stderr
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        outputs[implementation] = re.sub(r'"position":"[0-9A-F]+:', '"position":"',
                                         result.stdout)
    assert outputs["c"] == outputs["python"]
    assert len(outputs["c"].splitlines()) >= 400


@compiled_only
@pytest.mark.parametrize("count", [1, 2, 5000])
def test_taking_a_chunks_positions_at_once_moves_the_decoder_as_one_by_one(database, count):
    """`take_positions` on the compiled decoder's `next_position` (its index moved on at once)
    and on a pure one's: the first and last of ``count`` positions, and the decoder's next
    position after them, as taking them one by one gives."""
    import struct

    from changefeed.backends.postgres.pgoutput import PgOutputDecoder

    begin = b"B" + struct.pack("!QqI", 0x1A2B3C4D5E, 1_000_000, 77)
    results = []
    for cls in (PgOutputDecoder, PgOutputDecoder.python_class, PgOutputDecoder):
        decoder = cls(loaders=psycopg_loaders())
        decoder.decode(begin)
        decoder.next_position()  # a change before the chunk
        if len(results) < 2:
            first, last = kernels.take_positions(decoder.next_position, count)
        else:
            taken = [decoder.next_position() for _ in range(count)]
            first, last = taken[0], taken[-1]
        results.append((first, last, decoder.next_position()))
    assert results[0] == results[1] == results[2]
    assert results[0][1].index - results[0][0].index == count - 1


# -- COPY's text format, on its own -----------------------------------------------------------

ESCAPED = [
    (b"plain\t\\N\t", [b"plain", None, b""]),
    (b"\\\\N\t\\N", [b"\\N", None]),
    (b"a\\tb\\nc\\rd\\\\e\\bf\\fg\\vh", [b"a\tb\nc\rd\\e\bf\fg\vh"]),
    (b"\\101\\0\\7\\1234\\777", [b"A\x00\x07S4\xff"]),  # octal: at most 3 digits, 8 bits
    (b"\\x41\\x4a2\\xg\\x", [b"AJ2xgx"]),  # hex: 1 or 2 digits; \x alone is x
    (b"\\q\\.\t\\\\\\", [b"q.", b"\\\\"]),  # another escaped character is itself
    (b"end\\", [b"end\\"]),  # a lone backslash at the end stays
]


@pytest.mark.parametrize("line,fields", ESCAPED)
def test_copy_fields_undoes_copys_escapes(line, fields):
    assert copy_fields(line) == fields
    assert copy_fields(line + b"\n") == fields


def text_parsers(width: int) -> list[Any]:
    shape = CopyShape("public.t", tuple(f"c{i}" for i in range(width)), (25,) * width,
                      (0,), (0,), 1, ("c0",), key_names=("c0",))  # c0's ::text first
    loaders = TypeLoaders()
    parsers = [RowParser(shape, loaders)]
    if kernels is not None:
        parsers.append(kernels.CopyParser(shape, loaders))
    return parsers


def compiled_fields(line: bytes) -> list[bytes | None]:
    """Each field of ``line`` as the kernel unescapes it (`copy_fields`, compiled)."""
    return [None if field == b"\\N" else kernels.copy_unescaped(field)
            for field in line.rstrip(b"\n").split(b"\t")]


@compiled_only
@pytest.mark.parametrize("line,fields", ESCAPED)
def test_the_compiled_parser_undoes_the_same_escapes(line, fields):
    assert compiled_fields(line) == fields
    row = b"k\\tey\t" + line
    python, compiled = text_parsers(len(fields))
    assert python.rows([row]) == compiled.rows([row])
    (loaded,), last = compiled.rows([row])
    assert last == row.rstrip(b"\n") and python.key(last) == compiled.key(last) == ["k\tey"]
    assert [value if value is None else str(value).encode(errors="surrogateescape")
            for value in loaded.values()] == [
        field if field is None else field.decode(errors="replace").encode(
            errors="surrogateescape") for field in fields]


@compiled_only
def test_both_parsers_agree_on_random_lines():
    """Random fields of random bytes with every escape, in both parsers: the same rows, the
    same keys, and each field unescaped to the same bytes."""
    rng = random.Random(7)
    pieces = [b"\\\\", b"\\t", b"\\n", b"\\r", b"\\b", b"\\f", b"\\v", b"\\N",
              b"\\x4", b"\\xAf", b"\\x", b"\\0", b"\\12", b"\\377", b"\\9", b"a",
              b"\xc3\xa9", b"x", b"\\"]
    python, compiled = text_parsers(4)
    for _ in range(2000):
        line = b"\t".join(b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
                           for _ in range(5)) + b"\n"
        assert python.rows([line]) == compiled.rows([line]), line
        assert copy_fields(line) == compiled_fields(line), line


@pytest.mark.parametrize("line", [b"k\ta\tb\n", b"k\ta\tb\tc\td", b"k"])
def test_a_row_of_another_width_is_a_decode_error(line):
    for parser in text_parsers(3):
        with pytest.raises(DecodeError, match="a COPY row of .* columns, not 4"):
            parser.rows([line])


@compiled_only
def test_rows_whose_key_repeats_keep_their_order_in_the_lines():
    """A key given by the user need not be unique: rows come out in the order read, both
    paths, and a change of the stream takes out every row of its key."""
    (python, _), (_, compiled) = text_parsers(2), text_parsers(2)
    lines = [b"k\tA\tx\n", b"k\tB\ty\n", b"k\tA\tz\n", b"k\tC\tw\n"]
    copied, _ = compiled.lines_of(lines)
    assert copied.tokens(0, 4) == [("A",), ("B",), ("A",), ("C",)]
    assert copied.by_token() == {("A",): [0, 2], ("B",): 1, ("C",): 3}
    rows, _ = python.rows(lines)
    backfill = TableBackfill(1, "public.t", ["c0"], ["text"])
    cases = [([], [0, 1, 2, 3]), ([("A",)], [1, 3]), ([("A",), ("Z",), ("C",)], [1]),
             ([("B",), None], [])]  # None: a truncate
    for dropped, kept in cases:
        windows = (ChunkWindow(backfill, "w", rows, None, False),
                   ChunkWindow(backfill, "w", copied, None, False, lines=True))
        for window in windows:
            for token in dropped:
                window.drop(token)
            assert list(window.kept()) == kept and window.count == len(kept)
        changes, _ = window_changes(windows[0], "public.t", None, positions(1), markers=False)
        got = copied.lines(windows[1].kept(), "change", None, "public.t", None, 1 << 24, 0)
        assert got.lines() == [change_line(change) for change in changes]
        assert [change.new["c1"] for change in changes] == [rows[i]["c1"] for i in kept]
