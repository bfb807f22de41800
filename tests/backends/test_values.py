"""Every PostgreSQL type family, streamed and snapshotted, against PostgreSQL's own text.

Each case is (SQL expression, PostgreSQL's text of the stored value, the Python value expected,
the JSON expected). For each family a table is filled before the feed starts (the snapshot
reads those rows) and again after (the stream carries those), and every row is checked:
``SELECT val::text`` is the text given (so the expectations are tied to what PostgreSQL stored),
the value in the Change is the Python value (type included), and `dumps` gives the JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

import pytest
from feeds import make_feed
from psycopg.types.range import Range

from changefeed import UNCHANGED
from changefeed.backends.postgres.values import (
    Interval,
    JsonDecimal,
    JsonInt,
    NonFiniteFloat,
    PostgresText,
    TimeTZ,
)
from changefeed.formats.codec import dumps, dumps_line
from changefeed.formats.delta import delta_line_encoder, delta_of

pytestmark = pytest.mark.postgres

UTC = timezone.utc


def same(got: Any, expected: Any) -> bool:
    """Equal, of the same type, recursively (NaN equals NaN; PostgresText types compared)."""
    if type(got) is not type(expected):
        return False
    if isinstance(expected, float) and math.isnan(expected):
        return math.isnan(got)
    if isinstance(expected, Decimal):  # digit for digit (NaN included)
        return str(got) == str(expected)
    if isinstance(expected, PostgresText):
        return got == expected and got.type == expected.type
    if isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(map(same, got, expected))
    if isinstance(expected, dict):
        return list(got) == list(expected) and all(same(got[k], expected[k]) for k in expected)
    if isinstance(expected, Range):
        return got.isempty == expected.isempty and got.bounds == expected.bounds and (
            same(got.lower, expected.lower) and same(got.upper, expected.upper))
    return bool(got == expected)


_tables = itertools.count(1)


def check_family(pg, pg_dsn, column_type: str, cases, setup: tuple[str, ...] = ()) -> None:
    for statement in setup:
        pg.execute(statement)
    table = f"v{next(_tables)}"  # a table, so a slot, of its own: each has its snapshot
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, val {column_type})")
    n = len(cases)
    for i, (expression, *_) in enumerate(cases, 1):
        pg.execute(f"INSERT INTO {table} VALUES ({i}, {expression})")
    feed = make_feed(pg_dsn, table, prefeed="snapshot")
    snapshot = take(feed, n)
    for i, (expression, *_) in enumerate(cases, n + 1):
        pg.execute(f"INSERT INTO {table} VALUES ({i}, {expression})")
    streamed = take(feed, n)
    assert [c.snapshot for c in snapshot + streamed] == [True] * n + [False] * n
    # The output function's text (what pgoutput sends; `::text` differs for inet).
    texts = dict(pg.execute(
        f"SELECT id, CASE WHEN val IS NOT NULL THEN format('%s', val) END FROM {table}"
    ).fetchall())
    encode = delta_line_encoder()
    for i, (expression, text, value, encoded) in enumerate(cases):
        assert texts[i + 1] == texts[n + i + 1] == text, expression
        for change in (snapshot[i], streamed[i]):
            got = change.new["val"]
            assert same(got, value), (expression, got, value)
            assert dumps(got) == encoded, (expression, dumps(got))
            assert encode(change) == dumps_line(delta_of(change))


def take(feed, n: int) -> list:
    got = []
    for change in feed.changes(limit=n, timeout=60):
        got.append(change)
        feed.ack(change.position)
    assert len(got) == n
    return sorted(got, key=lambda c: c.key["id"])


def js(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def textual(type_name: str, *pairs: tuple[str, str]) -> list:
    """Cases of a family that stays PostgreSQL's text (a str, a JSON string)."""
    return [(f"{literal}::{type_name}", text, text, js(text)) for literal, text in pairs]


def test_integers_and_booleans(pg, pg_dsn):
    check_family(pg, pg_dsn, "int8", [
        ("-9223372036854775808", "-9223372036854775808", -(2**63), b"-9223372036854775808"),
        ("9223372036854775807", "9223372036854775807", 2**63 - 1, b"9223372036854775807"),
        ("0", "0", 0, b"0"),
        ("NULL", None, None, b"null"),
    ])


def test_small_integers_oids_and_booleans_in_arrays(pg, pg_dsn):
    check_family(pg, pg_dsn, "int2[]", [
        ("'{-32768,32767,NULL}'", "{-32768,32767,NULL}", [-32768, 32767, None],
         b"[-32768,32767,null]"),
    ])


@pytest.mark.parametrize("type_name,cases", [
    ("oid", [("4294967295", "4294967295", 4294967295, b"4294967295")]),
    ("bool", [("true", "t", True, b"true"), ("false", "f", False, b"false")]),
    ("name", [("'a name'", "a name", "a name", b'"a name"')]),
    ('"char"', [("'x'", "x", "x", b'"x"')]),
    ("varchar(10)", [("'short'", "short", "short", b'"short"')]),
    ("bool[]", [("'{t,NULL,f}'", "{t,NULL,f}", [True, None, False], b"[true,null,false]")]),
])
def test_oids_booleans_and_names(pg, pg_dsn, type_name, cases):
    check_family(pg, pg_dsn, type_name, cases)


def test_numeric_exact_and_non_finite(pg, pg_dsn):
    check_family(pg, pg_dsn, "numeric", [
        ("'-1.50'", "-1.50", Decimal("-1.50"), b'"-1.50"'),
        ("'123456789012345678901234567890.000000000000000000001'",
         "123456789012345678901234567890.000000000000000000001",
         Decimal("123456789012345678901234567890.000000000000000000001"),
         b'"123456789012345678901234567890.000000000000000000001"'),
        ("'NaN'", "NaN", Decimal("NaN"), b'"NaN"'),
        ("'Infinity'", "Infinity", Decimal("Infinity"), b'"Infinity"'),
        ("'-Infinity'", "-Infinity", Decimal("-Infinity"), b'"-Infinity"'),
    ])


@pytest.mark.parametrize("float_type", ["float8", "float4"])
def test_floats_non_finite_are_not_null(pg, pg_dsn, float_type):
    check_family(pg, pg_dsn, float_type, [
        ("1.5", "1.5", 1.5, b"1.5"),
        ("0.1", "0.1", 0.1, b"0.1"),
        ("'-0'", "-0", -0.0, b"-0.0"),
        ("'NaN'", "NaN", NonFiniteFloat("nan"), b'"NaN"'),
        ("'Infinity'", "Infinity", NonFiniteFloat("inf"), b'"Infinity"'),
        ("'-Infinity'", "-Infinity", NonFiniteFloat("-inf"), b'"-Infinity"'),
        ("NULL", None, None, b"null"),
    ])


def test_float_arrays_keep_non_finite_elements(pg, pg_dsn):
    check_family(pg, pg_dsn, "float8[]", [
        ("'{NaN,1e308,-Infinity}'", "{NaN,1e+308,-Infinity}",
         [NonFiniteFloat("nan"), 1e308, NonFiniteFloat("-inf")], b'["NaN",1e+308,"-Infinity"]'),
    ])


def test_strings(pg, pg_dsn):
    check_family(pg, pg_dsn, "text", [
        ("'plain'", "plain", "plain", b'"plain"'),
        ("E'line\\nbreak \"quoted\" \\\\ ü 😀'", 'line\nbreak "quoted" \\ ü 😀',
         'line\nbreak "quoted" \\ ü 😀', js('line\nbreak "quoted" \\ ü 😀')),
        ("''", "", "", b'""'),
    ])
    check_family(pg, pg_dsn, "char(5)", [("'ab'", "ab   ", "ab   ", b'"ab   "')])


def test_bytea_uuid_and_text_arrays(pg, pg_dsn):
    check_family(pg, pg_dsn, "bytea", [
        ("'\\x00ff'::bytea", "\\x00ff", b"\x00\xff", b'"AP8="'),
        ("''::bytea", "\\x", b"", b'""'),
    ])
    u = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    check_family(pg, pg_dsn, "uuid[]", [
        (f"ARRAY['{u}']::uuid[]", f"{{{u}}}", [u], js([str(u)])),
    ])
    check_family(pg, pg_dsn, "text[]", [
        ("ARRAY['a,b', 'c\"d', NULL, 'NULL']", '{"a,b","c\\"d",NULL,"NULL"}',
         ["a,b", 'c"d', None, "NULL"], b'["a,b","c\\"d",null,"NULL"]'),
        ("'{{a,b},{c,d}}'", "{{a,b},{c,d}}", [["a", "b"], ["c", "d"]], b'[["a","b"],["c","d"]]'),
        ("'{}'", "{}", [], b"[]"),
    ])


def test_dates_including_infinite_bc_and_beyond_9999(pg, pg_dsn):
    check_family(pg, pg_dsn, "date", [
        ("'2024-02-29'", "2024-02-29", date(2024, 2, 29), b'"2024-02-29"'),
        ("'0001-01-01'", "0001-01-01", date(1, 1, 1), b'"0001-01-01"'),
        ("'infinity'", "infinity", PostgresText("infinity", "date"), b'"infinity"'),
        ("'-infinity'", "-infinity", PostgresText("-infinity", "date"), b'"-infinity"'),
        ("'4713-01-01 BC'", "4713-01-01 BC", PostgresText("4713-01-01 BC", "date"),
         b'"4713-01-01 BC"'),
        ("'10000-01-01'", "10000-01-01", PostgresText("10000-01-01", "date"), b'"10000-01-01"'),
    ])


def test_date_arrays_keep_each_element(pg, pg_dsn):
    check_family(pg, pg_dsn, "date[]", [
        ("'{2020-01-01,infinity,NULL}'", "{2020-01-01,infinity,NULL}",
         [date(2020, 1, 1), PostgresText("infinity", "date"), None],
         b'["2020-01-01","infinity",null]'),
    ])


def test_timestamps(pg, pg_dsn):
    check_family(pg, pg_dsn, "timestamp", [
        ("'2024-01-02 03:04:05.5'", "2024-01-02 03:04:05.5", datetime(2024, 1, 2, 3, 4, 5, 500000),
         b'"2024-01-02T03:04:05.500000"'),
        ("'infinity'", "infinity", PostgresText("infinity", "timestamp"), b'"infinity"'),
        ("'0044-03-15 12:00 BC'", "0044-03-15 12:00:00 BC",
         PostgresText("0044-03-15 12:00:00 BC", "timestamp"), b'"0044-03-15 12:00:00 BC"'),
        ("'294276-12-31 23:59:59'", "294276-12-31 23:59:59",
         PostgresText("294276-12-31 23:59:59", "timestamp"), b'"294276-12-31 23:59:59"'),
    ])
    check_family(pg, pg_dsn, "timestamptz", [
        ("'2024-01-02 03:04:05+02'", "2024-01-02 01:04:05+00",
         datetime(2024, 1, 2, 1, 4, 5, tzinfo=UTC), b'"2024-01-02T01:04:05+00:00"'),
        ("'-infinity'", "-infinity", PostgresText("-infinity", "timestamptz"), b'"-infinity"'),
        ("'10000-01-01 00:00+00'", "10000-01-01 00:00:00+00",
         PostgresText("10000-01-01 00:00:00+00", "timestamptz"), b'"10000-01-01 00:00:00+00"'),
    ])


def test_times_and_timetz(pg, pg_dsn):
    check_family(pg, pg_dsn, "time", [
        ("'23:59:59.999999'", "23:59:59.999999", time(23, 59, 59, 999999),
         b'"23:59:59.999999"'),
        ("'24:00'", "24:00:00", PostgresText("24:00:00", "time"), b'"24:00:00"'),
    ])
    plus2 = timezone(timedelta(hours=2))
    minus530 = timezone(-timedelta(hours=5, minutes=30))
    check_family(pg, pg_dsn, "timetz", [
        ("'12:00+02'", "12:00:00+02", TimeTZ(12, tzinfo=plus2), b'"12:00:00+02:00"'),
        ("'01:02:03.25-05:30'", "01:02:03.25-05:30", TimeTZ(1, 2, 3, 250000, minus530),
         b'"01:02:03.250000-05:30"'),
        ("'24:00+00'", "24:00:00+00", PostgresText("24:00:00+00", "timetz"), b'"24:00:00+00"'),
    ])


INTERVALS = [
    ("'1 mon'", Interval(1, 0, 0)),
    ("'1 year 2 mons 3 days 04:05:06.789'", Interval(14, 3, 14_706_789_000)),
    ("'-1 days'", Interval(0, -1, 0)),
    ("'-0.5 seconds'", Interval(0, 0, -500_000)),
    ("'1 mon -1 days 25:00:00'", Interval(1, -1, 90_000_000_000)),
    ("'-178000000 years'", Interval(-2_136_000_000, 0, 0)),
    ("'0'", Interval(0, 0, 0)),
    ("'-1 year -2 mons +3 days -04:05:06'", Interval(-14, 3, -14_706_000_000)),
    ("'2562047788:00:54.775807'", Interval(0, 0, 2**63 - 1)),
    ("'-2562047788:00:54.775807'", Interval(0, 0, -(2**63) + 1)),
    ("'0.000001 seconds'", Interval(0, 0, 1)),
]


def test_intervals_keep_months_days_and_time_apart(pg, pg_dsn):
    # The JSON is PostgreSQL's own ISO 8601 form of the value (IntervalStyle iso_8601).
    pg.execute("SET IntervalStyle TO iso_8601")
    isos = [pg.execute(f"SELECT {literal}::interval::text").fetchone()[0]
            for literal, _ in INTERVALS]
    pg.execute("SET IntervalStyle TO postgres")
    texts = [pg.execute(f"SELECT {literal}::interval::text").fetchone()[0]
             for literal, _ in INTERVALS]
    check_family(pg, pg_dsn, "interval", [
        (f"{literal}::interval", text, value, js(iso))
        for (literal, value), text, iso in zip(INTERVALS, texts, isos, strict=True)
    ])
    assert str(Interval(14, 3, 14_706_789_000)) == "P1Y2M3DT4H5M6.789S"


def test_json_and_jsonb_exact(pg, pg_dsn):
    cases = [
        ("'{\"a\": 1.0000000000000000001}'", '{"a": 1.0000000000000000001}',
         {"a": JsonDecimal("1.0000000000000000001")}, b'{"a":1.0000000000000000001}'),
        ("'{\"big\": 123456789012345678901234567890, \"neg\": -18446744073709551617}'",
         '{"big": 123456789012345678901234567890, "neg": -18446744073709551617}',
         {"big": JsonInt(123456789012345678901234567890), "neg": JsonInt(-(2**64) - 1)},
         b'{"big":123456789012345678901234567890,"neg":-18446744073709551617}'),
        ("'[1, 2.5, \"x\", null, true, {\"k\": []}]'", '[1, 2.5, "x", null, true, {"k": []}]',
         [1, JsonDecimal("2.5"), "x", None, True, {"k": []}], b'[1,2.5,"x",null,true,{"k":[]}]'),
        ("'\"top\"'", '"top"', "top", b'"top"'),
        ("'12345678901234567890123'", "12345678901234567890123",
         JsonInt(12345678901234567890123), b"12345678901234567890123"),
        ("'0.1'", "0.1", JsonDecimal("0.1"), b"0.1"),
        ("'18446744073709551615'", "18446744073709551615", 2**64 - 1, b"18446744073709551615"),
    ]
    check_family(pg, pg_dsn, "jsonb", cases)
    # json keeps its text as written; the value and its JSON are the same as jsonb's.
    check_family(pg, pg_dsn, "json", [
        (literal, text, value, encoded) for literal, text, value, encoded in cases
    ] + [
        ("E'{\"a\":\\n  [1e400]}'", '{"a":\n  [1e400]}', {"a": [JsonDecimal("1e400")]},
         b'{"a":[1E+400]}'),
    ])


def test_arrays_of_json_and_numeric(pg, pg_dsn):
    check_family(pg, pg_dsn, "jsonb[]", [
        ("ARRAY['{\"x\": 1.10}'::jsonb, NULL]", '{"{\\"x\\": 1.10}",NULL}',
         [{"x": JsonDecimal("1.10")}, None], b'[{"x":1.10},null]'),
    ])


def test_enums_domains_and_their_arrays(pg, pg_dsn):
    setup = (
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy go lucky')",
        "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
        "CREATE DOMAIN moodish AS mood",
        "CREATE TYPE holder AS (m mood, d posint, ds posint[], ms moodish[])",
    )
    check_family(pg, pg_dsn, "holder", [
        ("ROW('ok', 5, '{1,2}', '{sad,\"happy go lucky\"}')::holder",
         '(ok,5,"{1,2}","{sad,""happy go lucky""}")',
         {"m": "ok", "d": 5, "ds": [1, 2], "ms": ["sad", "happy go lucky"]},
         b'{"m":"ok","d":5,"ds":[1,2],"ms":["sad","happy go lucky"]}'),
    ], setup)
    for column_type, literal, text, value, encoded in [
        ("mood[]", "'{sad,ok}'", "{sad,ok}", ["sad", "ok"], b'["sad","ok"]'),
        ("posint", "7", "7", 7, b"7"),
        ("posint[]", "'{7,8}'", "{7,8}", [7, 8], b"[7,8]"),
        ("moodish", "'ok'", "ok", "ok", b'"ok"'),
    ]:
        check_family(pg, pg_dsn, column_type, [(literal, text, value, encoded)])


def test_composites_nested_and_in_arrays(pg, pg_dsn):
    setup = (
        "CREATE TYPE inner_t AS (at date, n numeric)",
        'CREATE TYPE outer_t AS (label text, "Odd Name" inner_t, spans int4range[])',
    )
    check_family(pg, pg_dsn, "outer_t[]", [
        ("ARRAY[ROW('x', ROW('2020-01-01', 1.5)::inner_t, '{\"[1,3)\"}')::outer_t,"
         " ROW(NULL, ROW('infinity', NULL)::inner_t, NULL)::outer_t]",
         '{"(x,\\"(2020-01-01,1.5)\\",\\"{\\"\\"[1,3)\\"\\"}\\")",'
         '"(,\\"(infinity,)\\",)"}',
         [{"label": "x", "Odd Name": {"at": date(2020, 1, 1), "n": Decimal("1.5")},
           "spans": [Range(1, 3, "[)")]},
          {"label": None, "Odd Name": {"at": PostgresText("infinity", "date"), "n": None},
           "spans": None}],
         b'[{"label":"x","Odd Name":{"at":"2020-01-01","n":"1.5"},'
         b'"spans":[{"lower":1,"upper":3,"bounds":"[)"}]},'
         b'{"label":null,"Odd Name":{"at":"infinity","n":null},"spans":null}]'),
    ], setup)


def test_ranges_and_multiranges(pg, pg_dsn):
    check_family(pg, pg_dsn, "int4range", [
        ("'[1,5)'", "[1,5)", Range(1, 5, "[)"), b'{"lower":1,"upper":5,"bounds":"[)"}'),
        ("'[1,5]'", "[1,6)", Range(1, 6, "[)"), b'{"lower":1,"upper":6,"bounds":"[)"}'),
        ("'empty'", "empty", Range(empty=True), b'{"empty":true}'),
        ("'(,5)'", "(,5)", Range(None, 5, "()"), b'{"lower":null,"upper":5,"bounds":"()"}'),
    ])
    check_family(pg, pg_dsn, "daterange", [
        ("'[2020-01-01,infinity)'", "[2020-01-01,infinity)",
         Range(date(2020, 1, 1), PostgresText("infinity", "date"), "[)"),
         b'{"lower":"2020-01-01","upper":"infinity","bounds":"[)"}'),
    ])
    check_family(pg, pg_dsn, "floatrange", [
        ("'[1.5,NaN]'", "[1.5,NaN]", Range(1.5, NonFiniteFloat("nan"), "[]"),
         b'{"lower":1.5,"upper":"NaN","bounds":"[]"}'),
    ], ("CREATE TYPE floatrange AS RANGE (subtype = float8)",))
    from psycopg.types.multirange import Multirange

    check_family(pg, pg_dsn, "floatmultirange", [
        ("'{[1,2),[5,6]}'", "{[1,2),[5,6]}", Multirange([Range(1.0, 2.0, "[)"),
                                                         Range(5.0, 6.0, "[]")]),
         b'[{"lower":1.0,"upper":2.0,"bounds":"[)"},{"lower":5.0,"upper":6.0,"bounds":"[]"}]'),
        ("'{}'", "{}", Multirange(), b"[]"),
    ])


def test_network_types(pg, pg_dsn):
    check_family(pg, pg_dsn, "inet", [
        ("'192.168.0.1'", "192.168.0.1", IPv4Address("192.168.0.1"), b'"192.168.0.1"'),
        ("'192.168.0.1/24'", "192.168.0.1/24", IPv4Interface("192.168.0.1/24"),
         b'"192.168.0.1/24"'),
        ("'2001:db8::1/64'", "2001:db8::1/64", IPv6Interface("2001:db8::1/64"),
         b'"2001:db8::1/64"'),
    ])
    check_family(pg, pg_dsn, "cidr", [
        ("'10.0.0.0/8'", "10.0.0.0/8", IPv4Network("10.0.0.0/8"), b'"10.0.0.0/8"'),
        ("'2001:db8::/32'", "2001:db8::/32", IPv6Network("2001:db8::/32"), b'"2001:db8::/32"'),
    ])
    check_family(pg, pg_dsn, "macaddr", textual("macaddr", ("'08:00:2B:01:02:03'",
                                                           "08:00:2b:01:02:03")))
    check_family(pg, pg_dsn, "macaddr8", textual("macaddr8", ("'08:00:2b:01:02:03:04:05'",
                                                             "08:00:2b:01:02:03:04:05")))


@pytest.mark.parametrize("type_name,pairs", [
    ("point", [("'(1,2.5)'", "(1,2.5)")]),
    ("line", [("'{1,2,3}'", "{1,2,3}")]),
    ("lseg", [("'[(0,0),(1,1)]'", "[(0,0),(1,1)]")]),
    ("box", [("'(1,1),(0,0)'", "(1,1),(0,0)")]),
    ("path", [("'[(0,0),(1,1),(2,0)]'", "[(0,0),(1,1),(2,0)]")]),
    ("polygon", [("'((0,0),(1,1),(1,0))'", "((0,0),(1,1),(1,0))")]),
    ("circle", [("'<(1,2),3>'", "<(1,2),3>")]),
    ("bit(4)", [("B'1010'", "1010")]),
    ("varbit", [("B'10'", "10"), ("B''", "")]),
    ("xml", [("'<a x=\"1\">t</a>'", '<a x="1">t</a>')]),
    ("tsvector", [("'a fat cat'", "'a' 'cat' 'fat'")]),
    ("tsquery", [("'fat & (rat | cat)'", "'fat' & ( 'rat' | 'cat' )")]),
    ("pg_lsn", [("'16/B374D848'", "16/B374D848")]),
])
def test_types_kept_as_postgres_text(pg, pg_dsn, type_name, pairs):
    check_family(pg, pg_dsn, type_name, textual(type_name, *pairs))


def test_money_as_decimal(pg, pg_dsn):
    # Feed sessions set lc_monetary to C, so the text is always this one.
    check_family(pg, pg_dsn, "money", [
        ("1234567.891", "$1,234,567.89", Decimal("1234567.89"), b'"1234567.89"'),
        ("-0.01", "-$0.01", Decimal("-0.01"), b'"-0.01"'),
    ])


# -- formerly fatal values do not stop a feed --------------------------------------------------

FORMERLY_FATAL = [
    ("date", "'infinity'"), ("timestamp", "'-infinity'"), ("timestamptz", "'infinity'"),
    ("date", "'4713-01-01 BC'"), ("timestamp", "'10000-01-01'"), ("time", "'24:00'"),
    ("timetz", "'12:00+02'"), ("jsonb", "'123456789012345678901234567890'"),
    ("float8", "'NaN'"), ("date[]", "'{infinity}'"),
]


def test_a_feed_goes_on_past_each_formerly_fatal_value(pg, pg_dsn):
    columns = ", ".join(f"c{i} {t}" for i, (t, _) in enumerate(FORMERLY_FATAL))
    pg.execute(f"CREATE TABLE v (id int PRIMARY KEY, {columns})")
    feed = make_feed(pg_dsn, "v")
    assert list(feed.changes(timeout=0.2)) == []
    for i, (_, literal) in enumerate(FORMERLY_FATAL):
        pg.execute(f"INSERT INTO v (id, c{i}) VALUES ({i}, {literal})")
    pg.execute("INSERT INTO v (id) VALUES (100)")
    got = take(feed, len(FORMERLY_FATAL) + 1)
    assert [c.key["id"] for c in got] == [*range(len(FORMERLY_FATAL)), 100]
    for i, change in enumerate(got[:-1]):
        value = change.new[f"c{i}"]
        text = pg.execute(f"SELECT c{i}::text FROM v WHERE id = {i}").fetchone()[0]
        assert value is not None and b"null" not in dumps(value)
        if isinstance(value, PostgresText):
            assert value == text
        # every other column of the row is NULL and stays so
        assert [k for k, v in change.new.items() if v is not None] == ["id", f"c{i}"]


def test_changefeed_run_prints_formerly_fatal_rows(pg, pg_dsn):
    from clitools import run_cli

    columns = ", ".join(f"c{i} {t}" for i, (t, _) in enumerate(FORMERLY_FATAL))
    pg.execute(f"CREATE TABLE v (id int PRIMARY KEY, {columns})")
    for i, (_, literal) in enumerate(FORMERLY_FATAL):
        pg.execute(f"INSERT INTO v (id, c{i}) VALUES ({i}, {literal})")
    result = run_cli("run", "v", "--url", pg_dsn, "--prefeed", "snapshot",
                     "--limit", str(len(FORMERLY_FATAL)), "-q")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["data"]["id"] for line in lines] == list(range(len(FORMERLY_FATAL)))
    assert lines[0]["data"]["c0"] == "infinity"
    assert lines[6]["data"]["c6"] == "12:00:00+02:00"
    assert lines[8]["data"]["c8"] == "NaN"


# -- unchanged TOASTed columns -----------------------------------------------------------------


def test_an_update_delta_names_the_unchanged_toasted_columns(pg, pg_dsn):
    pg.execute("CREATE TABLE v (id int PRIMARY KEY, n int, big text, note text)")
    pg.execute("ALTER TABLE v ALTER big SET STORAGE EXTERNAL")  # TOASTed, not compressed
    pg.execute("INSERT INTO v VALUES (1, 1, repeat('x', 100000), 'a')")
    feed = make_feed(pg_dsn, "v")
    assert list(feed.changes(timeout=0.2)) == []
    pg.execute("UPDATE v SET n = 2")
    (update,) = take(feed, 1)
    assert update.new["big"] is UNCHANGED
    delta = delta_of(update)
    assert delta["newData"] == {"id": 1, "n": 2, "note": "a"}
    assert delta["unchanged"] == ["big"]
    assert json.loads(delta_line_encoder()(update))["unchanged"] == ["big"]
    # Under REPLICA IDENTITY FULL the old row fills them in: nothing is left unnamed.
    pg.execute("ALTER TABLE v REPLICA IDENTITY FULL")
    pg.execute("UPDATE v SET n = 3")
    (update,) = take(feed, 1)
    assert update.new["big"] == "x" * 100000
    assert "unchanged" not in delta_of(update)


def test_a_change_a_stage_fails_on_goes_to_the_dead_letters_and_the_feed_goes_on(
    pg, pg_dsn, tmp_path
):
    from clitools import run_cli

    pg.execute("CREATE TABLE v (id int PRIMARY KEY, t text, d date, iv interval, f float8)")
    pg.execute("INSERT INTO v VALUES (1, 'x', 'infinity', '1 mon', 'NaN'),"
               " (2, 'x', '2020-01-01', '1 day', 1.5)")
    out, dead = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    args = ["run", "v", "--url", pg_dsn, "--prefeed", "snapshot", "--sink", str(out),
            "--filter", '["==", "t", "x"]', "--dead-letter", str(dead), "--until-idle", "1", "-q"]
    assert run_cli(*args).returncode == 0
    # The subscription stage fails on an update without the old value of t (REPLICA IDENTITY
    # DEFAULT): the change goes to the dead letters, values encoded as everywhere else.
    pg.execute("UPDATE v SET f = 'Infinity', d = '10000-01-01' WHERE id = 2")
    pg.execute("INSERT INTO v VALUES (3, 'x', '-infinity', '-1 mon 2 days', '-Infinity')")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["data"] for line in out.read_text().splitlines()] == [
        {"id": 1, "t": "x", "d": "infinity", "iv": "P1M", "f": "NaN"},
        {"id": 2, "t": "x", "d": "2020-01-01", "iv": "P1D", "f": 1.5},
        {"id": 3, "t": "x", "d": "-infinity", "iv": "P-1M2D", "f": "-Infinity"},
    ]
    [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["change"]["new"] == {
        "id": 2, "t": "x", "d": "10000-01-01", "iv": "P1D", "f": "Infinity"}


def test_a_table_without_a_key_is_snapshotted_with_the_same_values(pg, pg_dsn):
    # Without a primary key the snapshot reads the exported snapshot, not key chunks: the
    # values must be the same as the stream's all the same.
    from changefeed import Operation

    pg.execute("CREATE TYPE mood AS ENUM ('ok')")
    pg.execute("CREATE TABLE nk (d date, f float8, iv interval, j jsonb, m mood)")
    rows = "('infinity', 'NaN', '1 mon', '1.10', 'ok'), ('2020-01-01', 1.5, '-1 day', '[]', NULL)"
    pg.execute(f"INSERT INTO nk VALUES {rows}")
    feed = make_feed(pg_dsn, "nk", Operation.INSERT, prefeed="snapshot")

    def two():
        got = list(feed.changes(limit=2, timeout=60))
        for change in got:
            feed.ack(change.position)
        return sorted(got, key=lambda c: c.new["d"] == "infinity", reverse=True)

    snapshot = two()
    pg.execute(f"INSERT INTO nk VALUES {rows}")
    streamed = two()
    assert [c.snapshot for c in snapshot + streamed] == [True, True, False, False]
    for before, after in zip(snapshot, streamed, strict=True):
        assert dumps(before.new) == dumps(after.new)
        assert all(same(before.new[k], after.new[k]) for k in after.new)
    assert dumps(snapshot[0].new) == (
        b'{"d":"infinity","f":"NaN","iv":"P1M","j":1.10,"m":"ok"}')
