"""The pure parts of the sync service, without a server: values, ``where``, shapes' views of a
change, Electric messages, the log sink's entries."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import orjson
import pytest

from changefeed import UNCHANGED, Change, Operation
from changefeed.serve.sync.electric_messages import Messages, parse_offset
from changefeed.serve.sync.log import key_text
from changefeed.serve.sync.log_sink import LogSink
from changefeed.serve.sync.shapes import Shape, ShapeError, parse_columns, parse_table
from changefeed.serve.sync.values import Column, parse_literal, table_from_rows, to_pg_text
from changefeed.serve.sync.where import WhereError, compile_where

COLUMNS = [
    ("id", "int4", None, 0, True, "integer", -1, "N"),
    ("title", "text", None, 0, False, "text", -1, "S"),
    ("done", "bool", None, 0, True, "boolean", -1, "B"),
    ("price", "numeric", None, 0, False, "numeric(8,2)", (8 << 16 | 2) + 4, "N"),
    ("at", "timestamptz", None, 0, False, "timestamp with time zone", -1, "D"),
    ("tags", "_text", "text", 0, False, "text[]", -1, "A"),
    ("owner", "text", None, 0, False, "text", -1, "S"),
    ("name", "varchar", None, 0, False, "character varying(20)", 24, "S"),
]
TABLE = table_from_rows("public", "tasks", COLUMNS, ["id"])
ROW = {"id": 1, "title": "Hello", "done": False, "price": "12.50",
       "at": "2024-01-02T03:04:05.500000+00:00", "tags": ["a", "b c", None], "owner": "ann",
       "name": "x"}


def column(kind: str, dims: int = 0) -> Column:
    return Column("c", kind, kind, dims)


@pytest.mark.parametrize(("kind", "value", "text"), [
    ("int4", 5, "5"), ("int8", 2**62, str(2**62)), ("numeric", "1.50", "1.50"),
    ("float8", 1.0, "1"), ("float8", 0.1, "0.1"), ("float8", 1e20, "1e+20"),
    ("float8", "NaN", "NaN"), ("bool", True, "true"), ("bool", False, "false"),
    ("text", "a\nb", "a\nb"), ("jsonb", {"a": [1, None]}, '{"a":[1,null]}'),
    ("bytea", "YWI=", "\\x6162"), ("uuid", "0e3c7a4e-0000-4000-8000-000000000001",
                                   "0e3c7a4e-0000-4000-8000-000000000001"),
    ("timestamptz", "2024-01-02T03:04:05.500000+00:00", "2024-01-02 03:04:05.5+00"),
    ("timestamptz", "2024-01-02T03:04:05+00:00", "2024-01-02 03:04:05+00"),
    ("timestamp", "2024-01-02T03:04:05.000100", "2024-01-02 03:04:05.0001"),
    ("timestamp", "infinity", "infinity"), ("date", "2024-02-29", "2024-02-29"),
    ("timetz", "12:00:00+02:00", "12:00:00+02"), ("timetz", "12:00:00+05:30", "12:00:00+05:30"),
    ("time", "23:59:59.999999", "23:59:59.999999"), ("interval", "P1Y2M", "P1Y2M"),
    ("int4", None, None),
])
def test_values_are_written_as_postgresql_writes_them(kind: str, value: object,
                                                      text: str | None) -> None:
    from changefeed.serve.sync.values import KINDS

    assert to_pg_text(Column("c", kind, KINDS[kind]), value) == text


def test_arrays_are_postgresql_array_literals_with_quoting() -> None:
    text_array = Column("c", "text", "text", 1)
    assert to_pg_text(text_array, ["a", "b c", None, "", "NULL", 'q"x', "back\\slash"]) == (
        '{a,"b c",NULL,"","NULL","q\\"x","back\\\\slash"}')
    assert to_pg_text(Column("c", "int4", "int", 2), [[1, 2], [3, None]]) == "{{1,2},{3,NULL}}"
    with pytest.raises(ValueError, match="array"):
        to_pg_text(text_array, "not a list")
    with pytest.raises(ValueError, match="base64"):
        to_pg_text(Column("c", "bytea", "bytea"), "***")


def test_literals_are_read_as_the_type_they_are_compared_with() -> None:
    assert parse_literal("numeric", "1.5") == Decimal("1.5")
    assert parse_literal("timestamptz", "2024-01-01") == datetime(2024, 1, 1, tzinfo=timezone.utc)
    assert parse_literal("timestamptz", "2024-01-01 02:00+02") == datetime(
        2024, 1, 1, tzinfo=timezone.utc)
    assert parse_literal("bool", "yes") is True
    for kind, text in [("int", "1.5"), ("date", "soon"), ("bool", "maybe"), ("uuid", "x")]:
        with pytest.raises(ValueError, match=f"type {kind}"):
            parse_literal(kind, text)


@pytest.mark.parametrize(("where", "row", "expected"), [
    ("title = 'Hello'", ROW, True),
    ("title <> 'Hello' OR title IS NULL", {**ROW, "title": None}, True),
    ("NOT (title = 'Hello')", {**ROW, "title": None}, False),  # NOT unknown is unknown
    ("title IN ('a', NULL)", ROW, False),
    ("NOT title IN ('a', NULL)", ROW, False),  # unknown either way, as in SQL
    ("title IN ('Hello', NULL)", ROW, True),
    ("price > 12.4 AND price < '12.6'", ROW, True),
    ("price = 12.5", ROW, True),
    ("at >= '2024-01-02' AND at < '2024-01-03'::date", ROW, True),
    ("at > '2024-01-02T05:00:00+02:00'", ROW, True),
    ("done IS FALSE AND NOT done", ROW, True),
    ("title LIKE 'H_l%'", ROW, True), ("title LIKE 'h%'", ROW, False),
    ("title ILIKE 'h%'", ROW, True), ("title NOT LIKE '%o'", ROW, False),
    ("title LIKE '100\\%'", {**ROW, "title": "100%"}, True),
    ("id BETWEEN 1 AND 1", ROW, True), ("id NOT BETWEEN 2 AND 3", ROW, True),
    ("id / 2 = 0", ROW, True), ("id % 2 = 1 AND -id < 0", ROW, True),
    ("id IS NOT DISTINCT FROM 1", ROW, True), ("owner IS DISTINCT FROM NULL", ROW, True),
    ("lower(title) = 'hello' AND length(name) = 1", ROW, True),
    ("coalesce(title, 'none') = 'none'", {**ROW, "title": None}, True),
    ('"title" = $1', ROW, True),
])
def test_where_follows_sql_semantics(where: str, row: dict, expected: bool) -> None:
    matches, _ = compile_where(where, TABLE, {"1": "Hello"} if "$1" in where else None)
    assert matches(row) is expected


def test_where_normal_form_identifies_the_shape() -> None:
    assert compile_where("id=1", TABLE)[1] == compile_where("id   =  1", TABLE)[1]
    assert compile_where("id=$1", TABLE, {"1": "2"})[1] != compile_where(
        "id=$1", TABLE, {"1": "3"})[1]
    assert Shape(TABLE, "id = 1").digest == Shape(TABLE, "id=1").digest
    assert Shape(TABLE, "id = 1").digest != Shape(TABLE, "id = 1", columns=("id",)).digest
    assert Shape(TABLE, owner_column="owner", owner="ann").digest != Shape(
        TABLE, owner_column="owner", owner="bob").digest


@pytest.mark.parametrize(("where", "words"), [
    ("id = 'one'", "invalid input syntax for type int"), ("title > 3", "cannot compare"),
    ("nope", "unknown column"), ("t.id = 1", "not of table"), ("id = (SELECT 1)", "subquery"),
    ("now() > at", "not supported"), ("id = 1; id = 2", "one expression"),
    ("price + 'x' > 1", "invalid input"), ("title + 1 > 2", "numbers only"),
    ("SELECT 1", "not an expression"), ("id = ?", "$1"),
])
def test_bad_wheres_are_one_line_errors(where: str, words: str) -> None:
    with pytest.raises(WhereError, match=words.replace("$", r"\$")):
        compile_where(where, TABLE)
    with pytest.raises(ShapeError, match=words.replace("$", r"\$")):
        Shape(TABLE, where)


def test_views_enter_and_leave_the_where() -> None:
    shape = Shape(TABLE, "done")
    inside, outside = {**ROW, "done": True}, ROW
    assert shape.view("i", inside, None).operation == "insert"
    assert shape.view("i", outside, None) is None
    assert shape.view("u", inside, outside).operation == "insert"  # entered
    assert shape.view("u", outside, inside).operation == "delete"  # left
    assert shape.view("u", inside, {**inside, "title": "x"}).operation == "update"
    assert shape.view("u", outside, outside) is None
    assert shape.view("u", inside, None).operation == "insert"  # no old row known
    assert shape.view("d", None, inside).operation == "delete"
    assert shape.view("d", None, outside) is None
    owned = Shape(TABLE, owner_column="owner", owner="ann")
    assert owned.view("u", {**ROW, "owner": "bob"}, ROW).operation == "delete"
    assert owned.view("u", ROW, {**ROW, "owner": "bob"}).operation == "insert"
    assert owned.view("i", {**ROW, "owner": "bob"}, None) is None


def test_electric_messages_carry_what_the_replica_mode_says() -> None:
    new, old = {**ROW, "title": "New", "done": True}, ROW
    default = Messages(Shape(TABLE))
    update = orjson.loads(default.message(Shape(TABLE).view("u", new, old), {}))
    assert update["key"] == '"public"."tasks"/"1"'
    assert update["value"] == {"id": "1", "title": "New", "done": "true"}
    full = Messages(Shape(TABLE, replica="full"))
    update = orjson.loads(full.message(Shape(TABLE).view("u", new, old), {}))
    assert update["value"]["price"] == "12.50" and update["old_value"] == {
        "title": "Hello", "done": "false"}
    delete = orjson.loads(default.message(Shape(TABLE).view("d", None, old), {}))
    assert delete["value"] == {"id": "1"}
    projected = Messages(Shape(TABLE, columns=("id", "price")))
    assert projected.message(Shape(TABLE).view("u", new, old), {}) is None  # nothing it sees
    insert = orjson.loads(projected.message(Shape(TABLE).view("i", new, None), {}))
    assert insert["value"] == {"id": "1", "price": "12.50"}


def test_columns_and_tables_parameters() -> None:
    assert parse_columns('price,"id"', TABLE) == ("id", "price")  # in the table's order
    for text, words in [("title", "primary key"), ("id,", "empty name"), ('id,"x', "quote"),
                        ("id,Nope", "unknown column 'nope'")]:
        with pytest.raises(ShapeError, match=words):
            parse_columns(text, TABLE)
    assert parse_table("tasks") == ("public", "tasks")
    assert parse_table('App."Tasks"') == ("app", "Tasks")
    for text in ["", "a.b.c", "1x", "tasks; drop"]:
        with pytest.raises(ShapeError):
            parse_table(text)
    assert parse_offset("-1") == "-1" and parse_offset("12_0") == 12


def test_the_log_sink_keeps_whole_rows_and_follows_key_changes() -> None:
    sink = LogSink("postgresql://unused", "s", [TABLE])
    known = {("public.tasks", key_text({"id": 1})): ROW}

    def change(operation: Operation, new: dict | None, old: dict | None, key: dict,
               snapshot: bool = False) -> Change:
        return Change(operation, "public.tasks", new, old, key, "p", None, 7, snapshot)

    changes = [
        change(Operation.UPDATE, {**ROW, "title": UNCHANGED, "done": True}, {"id": 1},
               {"id": 1}),
        change(Operation.INSERT, {**ROW, "done": True}, None, {"id": 1}, snapshot=True),
        change(Operation.UPDATE, {**ROW, "id": 2}, {"id": 1}, {"id": 2}),
        change(Operation.DELETE, None, {"id": 9}, {"id": 9}),
        change(Operation.DELETE, None, {"id": 2}, {"id": 2}),
    ]
    entries, rows, head = sink._entries(changes, known, 10)  # the sink's pure part, no server
    assert [(e.seq, e.op, e.key) for e in entries] == [
        (11, "u", {"id": 1}), (12, "d", {"id": 1}), (13, "i", {"id": 2}), (15, "d", {"id": 2})]
    assert entries[0].new["title"] == "Hello" and entries[0].old == ROW  # filled from the log
    assert entries[1].old["done"] is True
    assert head == 15  # the unknown key's tombstone took 14
    assert sorted((r[1]["id"], r[2], r[3] is None) for r in rows) == [
        (1, 12, True), (2, 15, True), (9, 14, True)]
