"""Logical decoding messages (pg_logical_emit_message): the decoder, the feed, the CLI.

The decoder tests build 'M' messages from the protocol's description; the others run against
a real PostgreSQL 15 (tests/conftest.py) and check what the server really sends.
"""

from __future__ import annotations

import base64
import json
import signal
import struct

import psycopg
import pytest
from clitools import assert_one_clear_line, json_lines_before_kill, run_cli, start_cli
from feeds import FAST_RETRY, start

from changefeed import Change, ConfigurationError, MemoryCheckpoint, Message, Operation
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.backends.postgres.connection import check_messages
from changefeed.backends.postgres.pgoutput import PgOutputDecoder
from changefeed.backends.postgres.position import make_position

# -- the decoder (no server) -----------------------------------------------------------------


def begin(lsn: int, xid: int = 7) -> bytes:
    return b"B" + struct.pack("!QqI", lsn, 0, xid)


def commit(lsn: int) -> bytes:
    return b"C" + struct.pack("!BQQq", 0, lsn, lsn + 40, 0)


def message(prefix: str, content: bytes, lsn: int, transactional: bool = True) -> bytes:
    return (b"M" + struct.pack("!BQ", int(transactional), lsn) + prefix.encode() + b"\0"
            + struct.pack("!i", len(content)) + content)


def relation(oid: int = 16384) -> bytes:
    column = b"\x01id\0" + struct.pack("!Ii", 23, -1)
    return b"R" + struct.pack("!I", oid) + b"public\0t\0d" + struct.pack("!h", 1) + column


def insert(value: bytes, oid: int = 16384) -> bytes:
    return (b"I" + struct.pack("!I", oid) + b"N" + struct.pack("!h", 1) + b"t"
            + struct.pack("!i", len(value)) + value)


def decode(stream, **options):
    decoder = PgOutputDecoder(**options)
    return [event for event in map(decoder.decode, stream) if event is not None]


def test_a_transactional_message_takes_its_place_among_the_rows():
    stream = [relation(), begin(0x100), insert(b"1"), message("app:x", b'{"a": 1}', 0x90),
              insert(b"2"), commit(0x100)]
    events = [e for e in decode(stream, messages=["app:"]) if isinstance(e, (Change, Message))]
    assert [type(e) for e in events] == [Change, Message, Change]
    assert [e.position for e in events] == [make_position(0x100, i) for i in range(3)]
    msg = events[1]
    assert (msg.prefix, msg.content, msg.transactional, msg.transaction) == (
        "app:x", b'{"a": 1}', True, 7)
    assert msg.json() == {"a": 1}


@pytest.mark.parametrize("prefixes", [(), ("other",), ("app:y", "zzz")])
def test_unwanted_messages_still_count_for_positions(prefixes):
    stream = [relation(), begin(0x100), message("app:x", b"hi", 0x90), insert(b"1"),
              commit(0x100)]
    events = [e for e in decode(stream, messages=prefixes) if isinstance(e, (Change, Message))]
    assert [e.position for e in events] == [make_position(0x100, 1)]


def test_prefixes_match_by_startswith_and_empty_matches_all():
    stream = [begin(0x100), message("a.b", b"1", 1), message("ab", b"2", 2),
              message("b", b"3", 3), commit(0x100)]
    def prefixes(options):
        return [e.prefix for e in decode(stream, messages=options) if isinstance(e, Message)]
    assert prefixes(["a."]) == ["a.b"]
    assert prefixes(["a"]) == ["a.b", "ab"]
    assert prefixes(["b", "a.b"]) == ["a.b", "b"]
    assert prefixes([""]) == ["a.b", "ab", "b"]


def test_a_non_transactional_message_ending_where_a_commit_starts_comes_before_it():
    # Its LSN is the end of its WAL record, where the next record (here a commit) starts.
    stream = [relation(), message("n", b"x", 0x200, transactional=False),
              begin(0x200), insert(b"2"), commit(0x200)]
    events = [e for e in decode(stream, messages=["n"]) if isinstance(e, (Change, Message))]
    assert events[0].position < events[1].position == make_position(0x200, 0)


def test_a_non_transactional_message_has_its_own_position_between_transactions():
    stream = [relation(), begin(0x100), insert(b"1"), commit(0x100),
              message("n", b"x", 0x180, transactional=False),
              begin(0x200), insert(b"2"), commit(0x200)]
    events = [e for e in decode(stream, messages=["n"]) if isinstance(e, (Change, Message))]
    positions = [e.position for e in events]
    assert positions == [make_position(0x100, 0), make_position(0x17F, 0),
                         make_position(0x200, 0)]
    assert positions == sorted(positions)
    assert events[1].transactional is False and events[1].committed_at is None


@pytest.mark.parametrize("content, expected", [
    (b'{"k": [1, 2]}', {"content": {"k": [1, 2]}}),
    (b"42", {"content": 42}),
    (b"plain text", {"content": "plain text"}),
    (b"", {"content": ""}),
    ("h\u00e9".encode(), {"content": "h\u00e9"}),
    (b"\xff\x00\xfe", {"content": base64.b64encode(b"\xff\x00\xfe").decode(),
                       "content_encoding": "base64"}),
])
def test_the_json_line_of_a_message(content, expected):
    line = Message("p", content, "0000000000000100:00000000").to_dict()
    assert {k: v for k, v in line.items() if k.startswith("content")} == expected
    assert line["type"] == "message" and line["prefix"] == "p"


# -- against a real server -------------------------------------------------------------------

pg_marks = pytest.mark.postgres


def make_feed(dsn, messages=("app",), table="tasks", **options):
    return PostgresChangeFeed(table, connection=dsn, messages=messages, retry=FAST_RETRY,
                              **options)


def read(feed, *, count=None, idle=0.5, timeout=20.0, ack=True):
    """What ``feed`` has now (idle means caught up with the server's WAL: see `feeds.drain`),
    each acknowledged unless not ``ack``."""
    got = []
    for item in feed.changes(idle_timeout=idle, timeout=timeout, limit=count):
        got.append(item)
        if ack:
            feed.ack(item.position)
    return got


def summary(items):
    return [(i.prefix, i.text) if isinstance(i, Message) else (i.table, i.new["title"])
            for i in items]


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id serial PRIMARY KEY, title text)")
    pg.execute("CREATE TABLE notes (id serial PRIMARY KEY, title text)")
    return pg


def emit(conn, prefix, content, transactional=True):
    conn.execute("SELECT pg_logical_emit_message(%s, %s, %s::text)",
                 [transactional, prefix, content])


@pg_marks
def test_messages_and_rows_arrive_in_commit_order(pg_dsn, tasks):
    feed = make_feed(pg_dsn, table="tasks,notes")
    start(feed)  # creates the slot
    other = psycopg.connect(pg_dsn)
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks (title) VALUES ('a1')")
        emit(tasks, "app.one", "m1")
        other.execute("INSERT INTO notes (title) VALUES ('b1')")
        emit(other, "app.two", "m2")
        tasks.execute("INSERT INTO notes (title) VALUES ('a2')")
    other.commit()  # commits after the first transaction: comes after all of it
    emit(tasks, "app.three", "m3")  # autocommit: a transaction of its own
    other.close()
    got = read(feed)
    assert summary(got) == [
        ("public.tasks", "a1"), ("app.one", "m1"), ("public.notes", "a2"),
        ("public.notes", "b1"), ("app.two", "m2"),
        ("app.three", "m3"),
    ]
    positions = [item.position for item in got]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    first = got[1]
    assert first.transaction == got[0].transaction and first.committed_at == got[0].committed_at


@pg_marks
def test_messages_of_rolled_back_transactions_never_appear(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    with pytest.raises(RuntimeError):
        with tasks.transaction():
            emit(tasks, "app", "lost")
            tasks.execute("INSERT INTO tasks (title) VALUES ('lost')")
            raise RuntimeError("roll back")
    tasks.execute("BEGIN")
    emit(tasks, "app", "aborted")
    tasks.execute("ROLLBACK")
    tasks.execute("BEGIN")
    tasks.execute("SAVEPOINT s")
    emit(tasks, "app", "rolled back to savepoint")
    tasks.execute("ROLLBACK TO SAVEPOINT s")
    emit(tasks, "app", "kept")
    tasks.execute("COMMIT")
    assert summary(read(feed)) == [("app", "kept")]


@pg_marks
def test_non_transactional_messages_arrive_even_if_their_transaction_rolls_back(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    tasks.execute("BEGIN")
    tasks.execute("INSERT INTO tasks (title) VALUES ('never')")
    emit(tasks, "app", "at once", transactional=False)
    tasks.execute("ROLLBACK")
    tasks.execute("INSERT INTO tasks (title) VALUES ('after')")
    got = read(feed)
    assert summary(got) == [("app", "at once"), ("public.tasks", "after")]
    assert got[0].transactional is False and got[0].position < got[1].position


@pg_marks
def test_a_non_transactional_message_right_before_a_commit_has_a_position_of_its_own(
    pg_dsn, tasks
):
    # Its WAL record ends where the commit record starts: the transaction's commit LSN.
    feed = make_feed(pg_dsn)
    start(feed)
    for n in range(3):
        tasks.execute("BEGIN")
        tasks.execute("INSERT INTO tasks (title) VALUES (%s)", [f"r{n}"])
        emit(tasks, "app", f"n{n}", transactional=False)
        tasks.execute("COMMIT")
    got = read(feed)
    assert summary(got) == [item for n in range(3)
                            for item in (("app", f"n{n}"), ("public.tasks", f"r{n}"))]
    positions = [item.position for item in got]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


@pg_marks
def test_an_acknowledged_non_transactional_message_is_not_sent_again(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    emit(tasks, "app", "one", transactional=False)
    emit(tasks, "app", "two", transactional=False)
    first = read(feed, count=1)
    assert summary(first) == [("app", "one")]
    feed.close()
    # A new feed (a new process: nothing in memory) continues from the slot alone.
    again = read(make_feed(pg_dsn))
    assert summary(again) == [("app", "two")]
    assert read(make_feed(pg_dsn)) == []


@pg_marks
def test_unacknowledged_messages_come_again_with_the_same_positions(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    with tasks.transaction():
        emit(tasks, "app", "t1")
        tasks.execute("INSERT INTO tasks (title) VALUES ('r1')")
        emit(tasks, "app", "t2")
    emit(tasks, "app", "n1", transactional=False)
    first = read(feed, ack=False)
    assert summary(first) == [("app", "t1"), ("public.tasks", "r1"), ("app", "t2"),
                              ("app", "n1")]
    feed.ack(first[0].position)  # part of the transaction only: the slot stays before it
    feed.close()
    again = read(make_feed(pg_dsn), ack=False)
    assert [(type(i), i.position) for i in again] == [(type(i), i.position) for i in first]


@pg_marks
def test_a_checkpoint_inside_a_transaction_skips_its_messages_and_rows_up_to_it(pg_dsn, tasks):
    checkpoint = MemoryCheckpoint()
    feed = make_feed(pg_dsn, checkpoint=checkpoint, name="f")
    start(feed)
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks (title) VALUES ('r1')")
        emit(tasks, "app", "m1")
        tasks.execute("INSERT INTO tasks (title) VALUES ('r2')")
        emit(tasks, "app", "m2")
    first = read(feed, ack=False)
    assert summary(first) == [("public.tasks", "r1"), ("app", "m1"), ("public.tasks", "r2"),
                              ("app", "m2")]
    feed.ack(first[1].position)  # up to the first message: the slot stays before the transaction
    feed.close()
    again = read(make_feed(pg_dsn, checkpoint=checkpoint, name="f"))
    assert summary(again) == [("public.tasks", "r2"), ("app", "m2")]
    assert [i.position for i in again] == [i.position for i in first[2:]]


@pg_marks
def test_messages_only_with_the_option_and_rows_unchanged_without(pg_dsn, tasks):
    feed = make_feed(pg_dsn, messages=())
    start(feed)
    with tasks.transaction():
        emit(tasks, "app", "m")
        tasks.execute("INSERT INTO tasks (title) VALUES ('r')")
    got = read(feed)
    assert [(type(c), c.operation) for c in got] == [(Change, Operation.INSERT)]
    # The message still counts: the row's position is the same with or without messages.
    assert got[0].position.endswith(":00000001")


@pg_marks
def test_binary_content_and_large_messages(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    blob = bytes(range(256)) * 4000  # ~1 MB: no 8,000-byte limit as with NOTIFY
    tasks.execute("SELECT pg_logical_emit_message(true, 'app.bin', %s::bytea)", [blob])
    (got,) = read(feed)
    assert got.content == blob
    line = got.to_dict()
    assert line["content_encoding"] == "base64"
    assert base64.b64decode(line["content"]) == blob


@pg_marks
def test_messages_need_postgresql_14(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    conn = psycopg.connect(pg_dsn)
    try:
        fake_info = type("Info", (), {"server_version": 130011})()
        fake = type("Conn", (), {"info": fake_info})()
        with pytest.raises(ConfigurationError, match="PostgreSQL 14 or later.*13.11"):
            check_messages(fake, feed.messages)
        check_messages(conn, feed.messages)  # the real server is 15: accepted
    finally:
        conn.close()


# -- the command line ------------------------------------------------------------------------


@pg_marks
def test_cli_streams_messages_as_json_lines_among_deltas(pg_dsn, tasks):
    run_cli("run", "tasks", "--url", pg_dsn, "--messages", "app.", "--until-idle", "0.5", "-q")
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks (title) VALUES ('x')")
        emit(tasks, "app.json", '{"order": 7}')
        emit(tasks, "app.text", "not json")
        emit(tasks, "other", "filtered out")
    emit(tasks, "app.late", "after", transactional=False)
    result = run_cli("run", "tasks", "--url", pg_dsn, "--messages", "app.", "--format",
                     "change", "--until-idle", "0.5", "-q")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line.get("type", line.get("operation")) for line in lines] == [
        "insert", "message", "message", "message"]
    assert lines[1]["content"] == {"order": 7} and lines[1]["prefix"] == "app.json"
    assert lines[1]["transactional"] is True and lines[1]["position"] > lines[0]["position"]
    assert lines[2]["content"] == "not json"
    assert lines[3]["transactional"] is False and lines[3]["content"] == "after"
    # Acknowledged: a second run has nothing more.
    result = run_cli("run", "tasks", "--url", pg_dsn, "--messages", "app.", "--until-idle",
                     "0.5", "-q")
    assert result.returncode == 0 and result.stdout == ""


@pg_marks
def test_runs_that_end_at_a_transactions_last_message_do_not_repeat_it(pg_dsn, tasks):
    # --limit ends the run as the message is handed out, before its Commit was read.
    args = ["run", "tasks", "--url", pg_dsn, "--messages", "app.", "--format", "change", "-q"]
    run_cli(*args, "--until-idle", "0.5")
    for number in range(2):
        with tasks.transaction():
            tasks.execute("INSERT INTO tasks (title) VALUES ('x')")
            emit(tasks, "app.step", str(number))
    runs = [run_cli(*args, "--limit", "2") for _ in range(2)]
    runs.append(run_cli(*args, "--until-idle", "0.5"))
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    got = [[line.get("type", line.get("operation")) + ":" + str(line.get("content", ""))
            for line in map(json.loads, r.stdout.splitlines())] for r in runs]
    assert got == [["insert:", "message:0"], ["insert:", "message:1"], []]


@pg_marks
def test_cli_refuses_messages_with_pipeline_options(pg_dsn, tasks):
    result = run_cli("run", "tasks", "--url", pg_dsn, "--messages", "app", "--where",
                     "id == 1")
    assert_one_clear_line(result, "--messages")
    assert result.returncode == 2


def test_cli_refuses_messages_for_other_backends():
    result = run_cli("run", "tasks", "--url", "mongodb://localhost/x", "--messages", "app")
    assert_one_clear_line(result, "PostgreSQL")


@pg_marks
def test_a_killed_consumer_gets_every_message_again(pg_dsn, tasks):
    run_cli("run", "tasks", "--url", pg_dsn, "--messages", "app", "--until-idle", "0.5", "-q")
    for n in range(200):
        emit(tasks, "app", json.dumps({"n": n}), transactional=n % 2 == 0)
    with start_cli("run", "tasks", "--url", pg_dsn, "--messages", "app", "-q") as proc:
        seen = proc.read_json(3)
        # What reached the pipe was delivered (and may have been acknowledged): read it all.
        _, rest = proc.stop(signal.SIGKILL)
    seen += json_lines_before_kill(rest)
    result = run_cli("run", "tasks", "--url", pg_dsn, "--messages", "app", "--until-idle",
                     "0.5", "-q")
    after = [json.loads(line) for line in result.stdout.splitlines()]
    # At least once: nothing missing, and what comes again is identical (same position).
    assert {line["content"]["n"] for line in seen + after} == set(range(200))
    by_position = {}
    for line in seen + after:
        assert by_position.setdefault(line["position"], line) == line
