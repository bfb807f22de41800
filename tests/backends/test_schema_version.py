"""Every PostgreSQL change carries its table's schema version, which an ALTER TABLE changes."""

from __future__ import annotations

import json
import struct

import pytest
from clitools import run_cli
from feeds import FAST_RETRY

from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.backends.postgres.pgoutput import PgOutputDecoder, schema_version


def relation(columns, oid=16384, name="t"):
    body = b"".join(b"\x00" + column.encode() + b"\0" + struct.pack("!Ii", type_oid, typmod)
                    for column, type_oid, typmod in columns)
    return (b"R" + struct.pack("!I", oid) + b"public\0" + name.encode() + b"\0d"
            + struct.pack("!h", len(columns)) + body)


def insert(values, oid=16384):
    body = b"".join(b"t" + struct.pack("!i", len(v)) + v for v in values)
    return b"I" + struct.pack("!I", oid) + b"N" + struct.pack("!h", len(values)) + body


def version_after(columns, values):
    decoder = PgOutputDecoder()
    decoder.decode(relation(columns))
    decoder.decode(b"B" + struct.pack("!QqI", 0x100, 0, 1))
    return decoder.decode(insert(values)).schema_version


BASE = [("id", 23, -1), ("title", 1043, 14)]  # int, varchar(10)


@pytest.mark.parametrize("columns", [
    [("id", 23, -1), ("title", 1043, 24)],           # varchar(20)
    [("id", 23, -1), ("title", 25, -1)],             # text
    [("id", 23, -1), ("name", 1043, 14)],            # renamed
    [("title", 1043, 14), ("id", 23, -1)],           # reordered
    [("id", 23, -1), ("title", 1043, 14), ("x", 16, -1)],  # added
    [("id", 20, -1), ("title", 1043, 14)],           # bigint
])
def test_any_change_of_shape_changes_the_version(columns):
    text = {23: b"1", 20: b"1", 16: b"t"}
    values = [text.get(type_oid, b"a") for _, type_oid, _ in columns]
    assert version_after(columns, values) != version_after(BASE, [b"1", b"a"])


def test_the_same_shape_has_the_same_version_whatever_the_table_or_session():
    first = version_after(BASE, [b"1", b"a"])
    assert first == version_after(BASE, [b"2", b"b"])
    assert first == schema_version(["id", "title"], [struct.pack("!Ii", 23, -1),
                                                     struct.pack("!Ii", 1043, 14)])
    assert len(first) == 12 and int(first, 16) >= 0


pg_mark = pytest.mark.postgres


def read(feed, idle=1.0):
    got = []
    for change in feed.changes(idle_timeout=idle, timeout=20):
        got.append(change)
        feed.ack(change.position)
    return got


@pg_mark
@pytest.mark.parametrize("alter", [
    "ALTER TABLE app.items ADD COLUMN note text",
    "ALTER TABLE app.items DROP COLUMN price",
    "ALTER TABLE app.items RENAME COLUMN price TO cost",
    "ALTER TABLE app.items ALTER COLUMN price TYPE numeric(12, 4)",
    "ALTER TABLE app.items ALTER COLUMN name TYPE text",
])
def test_the_version_changes_at_an_alter_table_mid_stream(pg_dsn, pg, alter):
    pg.execute("CREATE SCHEMA app")
    pg.execute("CREATE TABLE app.items (id int PRIMARY KEY, name varchar(20),"
               " price numeric(10, 2))")
    feed = PostgresChangeFeed("app.items", connection=pg_dsn, retry=FAST_RETRY)
    read(feed, idle=0.3)
    pg.execute("INSERT INTO app.items (id, name) VALUES (1, 'a'), (2, 'b')")
    pg.execute("UPDATE app.items SET name = 'c' WHERE id = 1")
    pg.execute(alter)
    pg.execute("INSERT INTO app.items (id, name) VALUES (3, 'd')")
    pg.execute("DELETE FROM app.items WHERE id = 2")
    versions = [c.schema_version for c in read(feed)]
    assert len(versions) == 5 and None not in versions
    assert versions[0] == versions[1] == versions[2]
    assert versions[3] == versions[4] != versions[0]


@pg_mark
def test_unrelated_changes_keep_the_version_and_reconnecting_finds_it_again(pg_dsn, pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    pg.execute("CREATE TABLE other (id int PRIMARY KEY)")
    feed = PostgresChangeFeed("tasks", connection=pg_dsn, retry=FAST_RETRY)
    read(feed, idle=0.3)
    pg.execute("INSERT INTO tasks VALUES (1, 'a')")
    pg.execute("ALTER TABLE other ADD COLUMN x int")
    pg.execute("CREATE INDEX ON tasks (title)")
    pg.execute("INSERT INTO tasks VALUES (2, 'b')")
    first = read(feed)
    pg.execute("INSERT INTO tasks VALUES (3, 'c')")
    again = read(PostgresChangeFeed("tasks", connection=pg_dsn, retry=FAST_RETRY))
    assert len({c.schema_version for c in first + again}) == 1


@pg_mark
def test_the_change_format_shows_the_schema_version(pg_dsn, pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    run_cli("run", "tasks", "--url", pg_dsn, "--until-idle", "0.3", "-q")
    pg.execute("INSERT INTO tasks VALUES (1, 'a')")
    pg.execute("ALTER TABLE tasks ADD COLUMN done boolean")
    pg.execute("INSERT INTO tasks VALUES (2, 'b', true)")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--format", "change", "--until-idle",
                     "1", "-q")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(line["schema_version"]) for line in lines] == [12, 12]
    assert lines[0]["schema_version"] != lines[1]["schema_version"]


@pg_mark
def test_snapshot_rows_carry_the_same_version_as_the_stream(pg_dsn, pg):
    pg.execute("CREATE DOMAIN positive AS int CHECK (VALUE > 0)")
    pg.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    pg.execute(
        "CREATE TABLE wide (id int PRIMARY KEY, v varchar(7), n numeric(9, 3), p positive,"
        " m mood, a text[], t timestamptz(2), j jsonb, gone int,"
        " g int GENERATED ALWAYS AS (id * 2) STORED)"
    )
    pg.execute("ALTER TABLE wide DROP COLUMN gone")
    pg.execute("INSERT INTO wide (id, v, n, p, m) VALUES (1, 'a', 1.5, 3, 'sad')")
    feed = PostgresChangeFeed("wide", connection=pg_dsn, prefeed="snapshot", retry=FAST_RETRY)
    snapshot = read(feed, idle=0.5)
    pg.execute("INSERT INTO wide (id, v, n, p, m) VALUES (2, 'b', 2.5, 4, 'happy')")
    streamed = read(feed)
    assert [c.snapshot for c in snapshot + streamed] == [True, False]
    assert snapshot[0].schema_version == streamed[0].schema_version is not None
