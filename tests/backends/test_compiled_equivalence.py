"""The compiled hot path gives exactly what the pure-Python code gives.

A real PostgreSQL (started by the test setup) runs a workload covering every value family of the
README's Values table (NULLs, arrays of several dimensions, domains, enums, composites, ranges
and multiranges, NaN and Infinity, BC and infinite dates, ``24:00``, intervals, json with exact
numbers and deep nesting, bytea, inet/cidr, money, geometric and text-only types), unchanged
TOASTed columns under REPLICA IDENTITY DEFAULT and FULL, messages, truncates, a table altered
mid-stream and randomly generated rows. Its pgoutput stream is recorded once, then replayed
through the pure-Python decoder and the compiled one, in several configurations: every event
must be the same, value for value and type for type, and every output line (delta, change,
debezium, message) the same, byte for byte.
"""

from __future__ import annotations

import json
import select
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from clitools import run_cli
from equivalence import random_rows, same
from test_postgres_stream import NOTHING, keepalive, stream_of, xlogdata  # noqa: E402
from testservers import drop_database

from changefeed import _speedups
from changefeed.backends.postgres import connection
from changefeed.backends.postgres.feed import PostgresChangeFeed
from changefeed.backends.postgres.loading import psycopg_loaders
from changefeed.backends.postgres.pgoutput import Commit, PgOutputDecoder, Truncated
from changefeed.backends.postgres.position import PgPosition
from changefeed.change import ALL, Change, Operation
from changefeed.formats import debezium
from changefeed.formats.change_dict import change_line
from changefeed.formats.codec import dumps_line
from changefeed.formats.delta import delta_line_encoder
from changefeed.message import Message

pytestmark = pytest.mark.postgres

if _speedups.kernels is None:
    if _speedups.implementation == "python" and _speedups._requested == "python":
        pytest.skip("CHANGEFEED_IMPL=python: nothing compiled to compare", allow_module_level=True)
    pytest.fail("the compiled extension is not built (pip install -e . with a C compiler)",
                pytrace=False)

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE DOMAIN day AS date;
CREATE TYPE pair AS (a int, b text);
CREATE TYPE nested AS (p pair, at timestamptz, xs float8[]);
CREATE TYPE floatrange AS RANGE (subtype = float8);
CREATE TABLE scalars (
    id serial PRIMARY KEY, i2 int2, i4 int4, i8 int8, o oid, n numeric, n2 numeric(12, 2),
    f4 float4, f8 float8, flag bool, t text, vc varchar(20), c char(5), nm name, ch "char",
    bin bytea, u uuid, d date, ts timestamp, tz timestamptz, tm time, ttz timetz,
    iv interval, j json, jb jsonb, big text
);
CREATE TABLE composite_kinds (
    id int PRIMARY KEY, ia int[], ta text[], t2 text[][], fa float8[], da date[], na numeric[],
    ua uuid[], ja jsonb[], tza timestamptz[], m mood, ma mood[], pos positive, dd day,
    pr pair, ns nested, pra pair[], ir int4range, tr tstzrange, fr floatrange, dr daterange,
    mr int4multirange, inet_v inet, cidr_v cidr, mo money, mac macaddr, pt point, bx box,
    pa path, pg polygon, ci circle, bits bit(4), vb varbit, x xml, tsv tsvector, lsn pg_lsn
);
CREATE TABLE toasted (id int PRIMARY KEY, note text, big text, blob bytea);
CREATE TABLE toasted_full (id int PRIMARY KEY, note text, big text);
ALTER TABLE toasted_full REPLICA IDENTITY FULL;
CREATE TABLE keyless (a int, b text);
ALTER TABLE keyless REPLICA IDENTITY FULL;
CREATE TABLE "Mixed Case" (k text, n int, v text, PRIMARY KEY (k, n));
CREATE TABLE altered (id int PRIMARY KEY, a int, b text);
CREATE TABLE unwatched (id int PRIMARY KEY, v text);
CREATE PUBLICATION equivalence FOR ALL TABLES;
"""

BIG = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 500) g)"

FIXED = [
    # every scalar family, ordinary values
    """INSERT INTO scalars (i2, i4, i8, o, n, n2, f4, f8, flag, t, vc, c, nm, ch, bin, u, d, ts,
       tz, tm, ttz, iv, j, jb, big) VALUES (-32768, 2147483647, -9223372036854775808,
       4294967295, '123456789012345678901234567890.000000000000000000001', 1234.5, 1.5,
       0.1, true, E'tab\\there "quoted" \\\\ ü 😀 \\u0001', 'short', 'ab', 'a name', 'x',
       '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29',
       '2024-01-02 03:04:05.5', '2024-01-02 03:04:05.123456+02', '23:59:59.999999',
       '12:00:00+02', '1 year 2 mons -3 days 04:05:06.789',
       '{"a": 1.0000000000000000001, "b": [1, 2e3, -0.5, 18446744073709551616], "a": "dup"}',
       '{"k": [true, false, null, "é\\n"], "n": 123456789012345678901234567890}',""" + BIG + ")",
    # NULL everywhere
    "INSERT INTO scalars (id) VALUES (DEFAULT)",
    # what Python cannot hold, and the non-finite numbers
    """INSERT INTO scalars (n, f4, f8, d, ts, tz, tm, iv, j, t) VALUES
       ('NaN', 'NaN', '-Infinity', '4713-01-01 BC', 'infinity', '10000-01-01 00:00:00+00',
        '24:00:00', '0', '[]', '')""",
    """INSERT INTO scalars (n, f4, f8, d, ts, tz, tm, iv, j) VALUES
       ('Infinity', 'Infinity', 'NaN', '-infinity', '0044-03-15 12:00:00 BC', '-infinity',
        '00:00:00', '-1 days -00:00:00.000001', '"just a string"')""",
    """INSERT INTO scalars (n, f8, d, ts, tz, tm, j, jb) VALUES
       ('-0.0000001', 1e308, '0001-01-01', '9999-12-31 23:59:59.999999',
        '0001-01-01 00:00:00+00', '00:00:00.000001',
        (SELECT repeat('[', 100) || repeat(']', 100))::json,
        (SELECT repeat('{"a":', 60) || '1.5' || repeat('}', 60))::jsonb)""",
    # json nested deeper than Python's json module goes, a number longer than Python's int():
    # kept as text
    "INSERT INTO scalars (j) VALUES ((SELECT repeat('[', 3000) || repeat(']', 3000))::json)",
    "INSERT INTO scalars (jb) VALUES (('[' || repeat('9', 5000) || ']')::jsonb)",
    # arrays, user types, ranges, network, money, geometric and text-only types
    """INSERT INTO composite_kinds VALUES (1, '{1,NULL,3}', ARRAY['a,b', 'c"d', NULL, 'NULL'],
       '{{a,b},{c,d}}', '{NaN,1e308,-Infinity}', '{2024-02-29,infinity,NULL}', '{1.50,NaN}',
       ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[], ARRAY['{"a":1.5}']::jsonb[],
       ARRAY['2024-01-02 03:04:05+00', '-infinity']::timestamptz[], 'happy', '{sad,ok}', 7,
       '2024-02-29', ROW(1, 'x'), ROW(ROW(2, 'y,z'), '2024-01-02 03:04:05+00', '{1.5,NaN}'),
       ARRAY[ROW(3, 'q')::pair, NULL], '[1,5)', '[2024-01-01 00:00:00+00,)', '(1.5,2.5]',
       'empty', '{[1,3), [5,7)}', '192.168.0.1/24', '10.0.0.0/8', '-1234567.89',
       '08:00:2b:01:02:03', '(1,2.5)', '((0,0),(1,1))', '[(0,0),(1,1),(2,0)]',
       '((0,0),(1,1),(2,0))', '<(1,1),2>', '1010', '10110', '<a>b</a>', 'a cat sat',
       '16/B374D848')""",
    "INSERT INTO composite_kinds (id) VALUES (2)",
    """INSERT INTO composite_kinds (id, ia, t2, inet_v, da, pr) VALUES (3, '{{1,2},{3,NULL}}',
       '{{{a}},{{NULL}}}', '::1', '{4713-01-01 BC}', ROW(NULL, NULL))""",
    # unchanged TOASTed values under REPLICA IDENTITY DEFAULT and FULL
    f"INSERT INTO toasted VALUES (1, 'first', {BIG}, decode(repeat('ab', 5000), 'hex'))",
    "UPDATE toasted SET note = 'second' WHERE id = 1",
    "UPDATE toasted SET id = 2 WHERE id = 1",
    "DELETE FROM toasted WHERE id = 2",
    f"INSERT INTO toasted_full VALUES (1, 'first', {BIG})",
    "UPDATE toasted_full SET note = 'second' WHERE id = 1",
    "DELETE FROM toasted_full WHERE id = 1",
    # no key, a quoted name, several rows per transaction, a table not watched
    """BEGIN; INSERT INTO keyless VALUES (1, 'a'), (NULL, NULL);
       UPDATE keyless SET b = 'b' WHERE a = 1; DELETE FROM keyless WHERE a IS NULL;
       INSERT INTO "Mixed Case" VALUES ('k', 1, 'v'); INSERT INTO unwatched VALUES (1, 'x');
       UPDATE "Mixed Case" SET n = 2; COMMIT""",
    # messages: transactional and not, JSON, text and binary content
    """BEGIN; INSERT INTO altered VALUES (1, 1, 'one');
       SELECT pg_logical_emit_message(true, 'app', '{"n": 1.50, "deep": [{"x": null}]}');
       SELECT pg_logical_emit_message(false, 'app', 'plain text');
       SELECT pg_logical_emit_message(true, 'other', '\\x00ff'::bytea);
       SELECT pg_logical_emit_message(true, 'app', '\\xfffe'::bytea); COMMIT""",
    "SELECT pg_logical_emit_message(false, 'app.side', 'outside')",
    # the relation changes mid-stream
    "ALTER TABLE altered ADD COLUMN c numeric DEFAULT 1.5",
    "INSERT INTO altered VALUES (2, 2, 'two', 2.25)",
    "ALTER TABLE altered DROP COLUMN a",
    "UPDATE altered SET b = 'TWO' WHERE id = 2",
    "ALTER TABLE altered RENAME COLUMN b TO label",
    "ALTER TABLE altered ALTER COLUMN c TYPE float8",
    "INSERT INTO altered VALUES (3, 'three', 'NaN')",
    "ALTER TABLE altered RENAME TO renamed",
    "INSERT INTO renamed VALUES (4, 'four', 4)",
    "DELETE FROM renamed WHERE id = 1",
    # one transaction of many rows: the direct path's batches of lines end by size too
    "INSERT INTO scalars (i4, t, n) SELECT g, repeat('x', 300), g / 7.0"
    " FROM generate_series(1, 2000) g",
    # truncates
    "TRUNCATE keyless, toasted",
    "TRUNCATE renamed CASCADE",
]




def record(dsn: str) -> list[bytes]:
    """The XLogData payloads of the workload, as the feed's replication session gets them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        repl = connection.connect(dsn, replication=True)
        repl.execute("CREATE_REPLICATION_SLOT equivalence LOGICAL pgoutput NOEXPORT_SNAPSHOT")
        for statement in FIXED:
            conn.execute(statement)
        for statement, params in random_rows(seed=21, count=300):
            conn.execute(statement, params)
        conn.execute("SELECT pg_logical_emit_message(false, 'end', 'end')")
    pgconn = repl.pgconn
    pgconn.send_query(b"START_REPLICATION SLOT equivalence LOGICAL 0/0 (proto_version '1',"
                      b" publication_names 'equivalence', messages 'true')")
    pgconn.get_result()
    messages: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nbytes, buffer = pgconn.get_copy_data(1)
        if nbytes == 0:
            select.select([pgconn.socket], [], [], 0.5)
            pgconn.consume_input()
            continue
        assert nbytes > 0, pgconn.get_error_message()
        if buffer[0] == ord("w"):
            payload = bytes(buffer[25:])
            messages.append(payload)
            if payload[:1] == b"M" and payload.endswith(b"end\x00\x00\x00\x00\x03end"):
                break
    else:
        raise AssertionError("the workload's end never came")
    repl.close()
    return messages


@pytest.fixture(scope="module")
def stream(pg_server) -> Iterator[tuple[str, list[bytes]]]:
    name = "compiled_equivalence"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = pg_server.dsn(name)
    try:
        yield dsn, record(dsn)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            drop_database(conn, name)  # and its slots




def decoders(dsn: str, **options: Any) -> tuple[Any, Any]:
    """The pure-Python decoder and the compiled one, with the same options and loaders of
    their own (as the feed makes them: user types looked up on a plain connection)."""
    def make(cls: type) -> Any:
        context = connection.connect(dsn)
        loaders = psycopg_loaders(context, catalog=lambda: connection.connect(dsn))
        return cls(loaders=loaders, **options)

    python, compiled = make(PgOutputDecoder.python_class), make(PgOutputDecoder)
    assert type(python).decode is PgOutputDecoder.python_class.decode
    assert hasattr(compiled, "kernel")
    return python, compiled


def lines(events: list[Any], compiled: bool) -> list[bytes]:
    """Every output line of the events, in each built-in format, written by the pure-Python
    encoders or by the compiled ones."""
    source = debezium.Source(database="equivalence")
    if compiled:
        kernels = _speedups.kernels
        delta, per_model = kernels.DeltaEncoder(), kernels.DeltaEncoder(MODELS)
        whole, envelope = kernels.ChangeEncoder(), kernels.DebeziumEncoder(source)
    else:
        delta = delta_line_encoder.python_factory()
        per_model = delta_line_encoder.python_factory(MODELS)
        envelope = debezium.line_encoder.python_factory(source)

        def whole(change: Change) -> bytes:
            return dumps_line(change.to_dict())

    out = []
    for event in events:
        if event.__class__ is Change:
            out += [delta(event), per_model(event), whole(event), envelope(event)]
        elif event.__class__ is Truncated:  # each watched table's Truncate, in every format
            for item in event.items:
                out += [delta(item), per_model(item), whole(item), envelope(item)]
        elif event.__class__ is Message:
            out.append(dumps_line(event.to_dict()))
    return out


MODELS = {"public.scalars": "Scalar", "toasted": "Toasted \"quoted\"", "*": "Other"}

CONFIGURATIONS = {
    "everything": dict(messages=("",)),
    "inserts of some tables": dict(
        operation=Operation.INSERT, tables=["public.scalars", "public.composite_kinds"]
    ),
    "updates and deletes, own keys": dict(
        operation=Operation.UPDATE | Operation.DELETE,
        primary_keys={"public.keyless": ["b"], "public.toasted": ["note"]},
        messages=("app",),
    ),
}


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_both_paths_decode_the_same_events(stream, configuration, monkeypatch):
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_123_456_789)  # Debezium's ts_ms
    dsn, messages = stream
    python, compiled = decoders(dsn, **CONFIGURATIONS[configuration])
    expected, got = [], []
    for payload in messages:
        want = python.decode(payload)
        have = compiled.decode(memoryview(payload))  # as the feed hands them over
        assert same(want, have), (payload[:1], want, have)
        if want is not None:
            expected.append(want)
            got.append(have)
        assert python.next_position() == compiled.next_position()
    kinds = {event.__class__.__name__ for event in expected}
    if configuration == "everything":
        assert kinds == {"Begin", "Commit", "Change", "Message", "Truncated"}
        operations = {event.operation for event in expected if event.__class__ is Change}
        assert operations | {Operation.TRUNCATE} == set(ALL)
        assert any(event.items for event in expected if event.__class__ is Truncated)
    want_lines, got_lines = lines(expected, compiled=False), lines(got, compiled=True)
    assert len(want_lines) == len(got_lines)
    for want, have in zip(want_lines, got_lines, strict=True):
        assert want == have


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
@pytest.mark.parametrize("fmt,model", [("delta", None), ("delta", MODELS), ("change", None)])
def test_the_direct_path_writes_the_lines_of_the_changes(stream, configuration, fmt, model):
    """`Decoder.encode`: pgoutput bytes to output lines without `Change` objects, the same
    lines (and positions) as decoding and then encoding gives."""
    dsn, messages = stream
    python, compiled = decoders(dsn, **CONFIGURATIONS[configuration])
    decode_lines = compiled.line_decoder(fmt, model)
    encode = delta_line_encoder.python_factory(model) if fmt == "delta" else change_line

    encoded = 0
    for payload in messages:
        want = python.decode(payload)
        have = decode_lines(memoryview(payload))
        if want.__class__ is Change:
            assert type(have) is _speedups.Lines
            assert (have.count, have.lines(), have.position) == (1, [encode(want)], want.position)
            assert type(have.position) is type(want.position)
            assert bytes(have) == encode(want)
            encoded += 1
        else:
            assert same(want, have)
    assert encoded >= 10


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
@pytest.mark.parametrize("fmt", ["delta", "change"])
def test_the_feeds_direct_path_writes_the_same_lines_in_batches(stream, configuration, fmt):
    """The stream loop's direct path: the compiled frame reader hands out a message, the line
    decoder takes the row changes at hand after it from the reader too, into `Lines` batches
    that end at any other message, when nothing more is at hand, or past a size; changes at
    or before ``replay_after`` are left out. Every line and position must be what decoding
    and encoding each message gives, and the loop's last change handed out the same."""
    dsn, messages = stream
    python, compiled = decoders(dsn, **CONFIGURATIONS[configuration])
    encode = delta_line_encoder.python_factory() if fmt == "delta" else change_line
    wanted = [event for event in map(python.decode, messages) if event.__class__ is Change]
    replay_after = wanted[len(wanted) // 3].position  # delivered before: left out
    script = []
    for number, payload in enumerate(messages):
        script.append(xlogdata(payload, start=number, wal_end=10**6 + number))
        if number % 7 == 0:
            script.append(keepalive(10**6, False))
        if number % 11 == 0 and not 100 < number < 2500:  # (the big transaction's whole)
            script.append(NOTHING)  # nothing more at hand for a moment: a batch ends
    python, _ = decoders(dsn, **CONFIGURATIONS[configuration])
    expected_lines, expected_positions, expected_last = [], [], []
    last = None
    for payload in messages:
        event = python.decode(payload)
        if event.__class__ is Change:
            last = event.position
            if event.position > replay_after:
                expected_lines.append(encode(event))
                expected_positions.append(event.position)
        elif event.__class__ is Commit:
            expected_last.append(last)
            last = None

    replication = stream_of(*script)
    assert type(replication.frames) is _speedups.kernels.FrameReader
    decode_lines = compiled.line_decoder(fmt, None, replication.frames, replay_after)
    lines, positions, last_handed_out, batches = [], [], [], []
    last = None
    while replication.pgconn.script:
        for payload in replication.frames:
            if payload is None:
                break
            event = decode_lines(payload)
            if type(event) is _speedups.Lines:
                assert event.seen is not None
                last = event.seen
                if event.count:
                    lines += event.lines()
                    positions += event.positions()
                    assert event.position == positions[-1] and bytes(event) == b"".join(
                        event.lines())
                    batches.append(event)
            elif event.__class__ is Commit:
                last_handed_out.append(last)
                last = None
    assert lines == expected_lines
    assert positions == expected_positions and all(type(p) is PgPosition for p in positions)
    assert last_handed_out == expected_last
    assert len(batches) < len(lines) and min(batch.count for batch in batches) == 1
    if not CONFIGURATIONS[configuration].get("operation", ALL) & Operation.INSERT:
        return  # the big transaction is all inserts
    assert max(batch.count for batch in batches) > 50
    assert max(batch.nbytes for batch in batches) < 70_000  # 64 KB and the line past it
    big = max(batches, key=lambda batch: batch.count)
    head = big.head(3)
    assert (head.lines(), head.position, head.count) == (big.lines()[:3], big.positions()[2], 3)


def test_the_workload_covers_what_it_claims(stream):
    """The recording holds what the comparison above relies on (so a change of the workload
    or of the server cannot make it compare less)."""
    dsn, messages = stream
    python, _ = decoders(dsn, messages=("",))
    events = [event for event in map(python.decode, messages) if event is not None]
    changes = [event for event in events if event.__class__ is Change]
    kinds: set[str] = set()

    def note(value: Any) -> None:
        kinds.add(type(value).__name__)
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            for item in value:
                note(item)

    for change in changes:
        note(change.new)
        note(change.old)
    assert {"int", "Decimal", "float", "NonFiniteFloat", "bool", "str", "bytes", "UUID", "date",
            "datetime", "time", "TimeTZ", "Interval", "dict", "list", "PostgresText",
            "RawJson", "Range", "Multirange", "IPv4Interface", "IPv6Address", "IPv4Network",
            "JsonDecimal", "JsonInt", "_Unchanged", "NoneType"} <= kinds, kinds
    assert len({change.schema_version for change in changes if "altered" in change.table
                or "renamed" in change.table}) == 4
    assert len(changes) > 300


def test_the_kernel_parses_json_itself(stream, monkeypatch):
    """The comparisons above would pass if the kernel handed every json value to our
    `JsonLoader`; with that broken, the kernel's own parser still gives plain values."""
    from changefeed.backends.postgres import values

    dsn, messages = stream
    _, compiled = decoders(dsn)

    def broken(self, data):
        raise AssertionError("the Python loader was called")

    monkeypatch.setattr(values.JsonLoader, "load", broken)
    rows = [event.new for event in map(compiled.decode, messages)
            if event.__class__ is Change and event.table == "public.scalars" and event.new]
    assert [row for row in rows if row["jb"] == {"x": 1}], "no jsonb {'x': 1} parsed"
    assert [row for row in rows if type(row["jb"]) is list and row["jb"]
            and type(row["jb"][0]).__name__ == "JsonDecimal"], "no jsonb number parsed"


@pytest.mark.parametrize("fmt", ["delta", "change"])
def test_changefeed_run_writes_the_same_lines_on_both_paths(pg_dsn, pg, tmp_path, fmt):
    """A whole ``changefeed run``, frames to stdout: the compiled direct path (batches of
    lines) and the pure-Python path write the same bytes, also when a run stops at a limit in
    the middle of a transaction and the next resumes from its checkpoint (the direct path
    leaves out what was delivered), with messages among the changes and unchanged TOASTed
    values."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, note text, big text)")
    pg.execute("CREATE PUBLICATION direct FOR TABLE t")
    pg.execute("SELECT pg_create_logical_replication_slot('template', 'pgoutput')")
    with pg.transaction():
        pg.execute(f"INSERT INTO t SELECT g, 'row ' || g, CASE WHEN g % 100 = 0 THEN {BIG} END"
                   " FROM generate_series(1, 3000) g")
        pg.execute("SELECT pg_logical_emit_message(true, 'app', 'in the transaction')")
    pg.execute("UPDATE t SET note = 'toasted' WHERE id % 100 = 0")  # big stays unchanged
    pg.execute("SELECT pg_logical_emit_message(false, 'app', 'alone')")
    for number in range(1, 30):  # single-row transactions
        pg.execute("DELETE FROM t WHERE id = %s", [number])
    items = 3000 + 1 + 30 + 1 + 29
    outputs = {}
    for implementation in ("python", "c"):
        slot, checkpoint = f"copy_{implementation}", str(tmp_path / f"{implementation}.json")
        pg.execute("SELECT pg_copy_logical_replication_slot('template', %s)", [slot])
        common = ["run", "t", "--url", pg_dsn, "--slot", slot, "--publication", "direct",
                  "--format", fmt, "--messages", "app", "--checkpoint", checkpoint, "--quiet"]
        environment = {"CHANGEFEED_IMPL": implementation}
        first = run_cli(*common, "--limit", "1234", env=environment)
        rest = run_cli(*common, "--until-idle", "0.5", env=environment)
        assert first.returncode == rest.returncode == 0, first.stderr + rest.stderr
        outputs[implementation] = first.stdout + rest.stdout
    assert outputs["c"] == outputs["python"]
    assert len(outputs["c"].splitlines()) == items


def test_the_feed_hands_out_batches_of_lines_when_asked(pg_dsn, pg):
    """`prefer_lines`: where the extension is built, the PostgreSQL feed hands out `Lines`
    for the formats the kernel writes (delta, change), and a limit cuts a batch."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    assert not PostgresChangeFeed("t", connection=pg_dsn).prefer_lines("debezium")
    feed = PostgresChangeFeed("t", connection=pg_dsn)
    assert feed.prefer_lines("delta")
    assert list(feed.changes(timeout=0.2)) == []  # the slot exists from here on
    pg.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g")
    changes = feed.changes(limit=300, timeout=20)
    items = [next(changes)]
    assert feed._stream.frames.reads_libpq  # with libpq itself, not through psycopg's call
    items += changes
    feed.close()
    assert {type(item) for item in items} == {_speedups.Lines}
    assert sum(item.count for item in items) == 300 and len(items) < 300
    encode = delta_line_encoder.python_factory()
    assert b"".join(map(bytes, items)) == b"".join(
        encode(Change(Operation.INSERT, "public.t", {"id": g, "v": f"v{g}"}))
        for g in range(1, 301))
    assert items[-1].position.index == 299


def test_the_feed_counts_every_change_of_its_batches(pg_dsn, pg):
    """A `Lines` batch counts as the changes it holds in the feed's stats (what progress and
    ``changefeed status`` show), as the changes would one by one."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    feed = PostgresChangeFeed("t", connection=pg_dsn)
    assert feed.prefer_lines("delta")
    assert list(feed.changes(timeout=0.2)) == []
    # Three transactions of 2,000 rows: a batch holds what one read finds, and a walsender
    # starved of CPU can hand over a small transaction a message per read.
    for start in (1, 2001, 4001):
        pg.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(%s::int, %s::int + 1999) g",
                   [start, start])
    items = list(feed.changes(limit=6000, timeout=20))
    feed.close()
    assert sum(item.count for item in items) == 6000 and len(items) < 6000
    assert feed.stats.changes == 6000


WHERE_EXPRESSIONS = {  # and whether the stage fails (on a numeric NaN, which has no order)
    "id >= 0": False,  # every row
    'title == "row 7" or (amount > 10 and not flag == true)': True,
    'doc.kind == "a" and doc.n >= 2': False,  # nested JSON; rows without it do not match
    'at > "2024-01-01"': False,  # a datetime against a string: never a match (TypeError)
    "id > 2.5 and flag == 1": False,  # an int against a float, a bool against an int
    "title == null or amount <= 1.5": False,  # NULLs; the NaN row's title is NULL: or stops
    'note != "toasted"': False,  # unchanged TOASTed values: the row is judged in Python
    "amount < 5": True,
}


@pytest.mark.parametrize("expression", WHERE_EXPRESSIONS)
def test_changefeed_run_where_gives_the_same_on_both_paths(pg_dsn, pg, tmp_path, expression):
    """``changefeed run --where``: the pure-Python path runs a pipeline with a `where` stage;
    the compiled one filters in the decoder (the direct path, no Python call per change) and
    hands what it cannot judge to that stage's predicate. Same lines, same end, same
    acknowledgements (a limit counts dropped changes too, as a pipeline does)."""
    pg.execute("CREATE TABLE w (id int PRIMARY KEY, title text, amount numeric, at timestamptz,"
               " doc jsonb, flag bool, note text)")
    pg.execute("CREATE PUBLICATION direct FOR TABLE w")
    pg.execute("SELECT pg_create_logical_replication_slot('template', 'pgoutput')")
    with pg.transaction():
        pg.execute(
            "INSERT INTO w SELECT g, CASE WHEN g % 13 = 0 THEN NULL ELSE 'row ' || g END,"
            " (g % 17) * 1.5, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',"
            " CASE g % 4 WHEN 0 THEN jsonb_build_object('kind', 'a', 'n', g % 5)"
            " WHEN 1 THEN jsonb_build_object('kind', 'b') WHEN 2 THEN '[1, 2]'::jsonb END,"
            f" g % 3 = 0, CASE WHEN g % 50 = 0 THEN {BIG} END FROM generate_series(1, 2000) g")
    pg.execute("UPDATE w SET flag = NOT flag WHERE id % 50 = 0")  # note stays unchanged
    pg.execute("UPDATE w SET title = 'row 7' WHERE id BETWEEN 100 AND 110")
    pg.execute("DELETE FROM w WHERE id % 7 = 0")  # old keys only: the other fields missing
    for number in range(1, 20):
        pg.execute("INSERT INTO w (id, title, amount) VALUES (%s, 'late', %s)",
                   [10_000 + number, number])
    pg.execute("INSERT INTO w (id, amount) VALUES (20000, 'NaN')")
    results = {}
    for implementation in ("python", "c"):
        slot, checkpoint = f"copy_{implementation}", str(tmp_path / f"{implementation}.json")
        pg.execute("SELECT pg_copy_logical_replication_slot('template', %s)", [slot])
        common = ["run", "w", "--url", pg_dsn, "--slot", slot, "--publication", "direct",
                  "--where", expression, "--checkpoint", checkpoint, "--quiet"]
        environment = {"CHANGEFEED_IMPL": implementation}
        first = run_cli(*common, "--limit", "1500", env=environment)
        rest = run_cli(*common, "--until-idle", "0.5", env=environment)
        results[implementation] = (first.stdout, first.returncode, rest.stdout, rest.returncode,
                                   rest.stderr.strip().splitlines()[-1:])
    assert results["c"] == results["python"]
    first_lines, first_code, rest_lines, rest_code, _ = results["c"]
    assert (first_code, rest_code) == (0, 5 if WHERE_EXPRESSIONS[expression] else 0)
    assert first_lines or rest_lines or "at >" in expression


def test_the_direct_path_filters_in_the_decoder(pg_dsn, pg):
    """`prefer_lines(where=)`: rows that do not match are handled without a line, in C (the
    batch counts them); only a row the kernel cannot judge comes as a `Change`."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    feed = PostgresChangeFeed("t", connection=pg_dsn)
    assert feed.prefer_lines("delta", where=["and", [">=", "id", 10], ["==", "v", "keep"]])
    assert list(feed.changes(timeout=0.2)) == []
    pg.execute("INSERT INTO t SELECT g, CASE WHEN g % 2 = 0 THEN 'keep' ELSE 'drop' END"
               " FROM generate_series(1, 100) g")
    items = list(feed.changes(limit=100, timeout=20))
    feed.close()
    assert {type(item) for item in items} == {_speedups.Lines}
    assert sum(item.count for item in items) == 100
    kept = [line for item in items for line in item.lines() if line]
    assert [json.loads(line)["data"]["id"] for line in kept] == list(range(10, 101, 2))
