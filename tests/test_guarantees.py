"""The README's "Guarantees (PostgreSQL)", each checked on a real server so breaking it fails.

* nothing committed is lost: the CLI acknowledges only what it flushed; the slot moves past a
  transaction only once all of it is acknowledged; a restart from a checkpoint skips exactly
  what was acknowledged, inside transactions of hundreds of rows; ``--limit`` stopping inside
  a transaction leaves the rest of it to come again; a run that ends right after a
  transaction's last change (``--limit``, a stop request) leaves the slot past it, and free;
* positions are exact: commit LSN and index, ordered as strings past index 15 and 255;
* the publication follows ``--ops`` on a reused slot, widened and narrowed;
* errors that retrying cannot fix end the run with one line and their exit code.

Writes are made after the feed says it is streaming, and every wait has a deadline.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import threading
import time

import feeds
import psycopg
import pytest
from clitools import assert_exit, json_lines, run_cli, start_cli
from testservers import refused_port

from changefeed import ALL, FileCheckpoint, MemoryCheckpoint, Operation, Retry
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.backends.postgres.position import PgPosition
from changefeed.embedded import TemporaryPostgres

pytestmark = pytest.mark.postgres

ROWS = 300  # a transaction's row indices go past 0xF and 0xFF


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    return pg


def make_feed(dsn, operation=ALL, **options) -> PostgresChangeFeed:
    return PostgresChangeFeed("tasks", operation, connection=dsn,
                              retry=Retry(initial=0.05, maximum=0.5), **options)


def open_slot(dsn) -> None:
    """Create the slot and publication now, so that later writes are streamed."""
    assert list(make_feed(dsn).changes(timeout=0.5)) == []


def read(feed, count, *, ack_until=None, timeout=60):
    """Take ``count`` changes from ``feed``, acknowledging the first ``ack_until`` (default all);
    the stream is closed afterwards, as by a process that stops or crashes."""
    got = []
    for change in feed.changes(limit=count, timeout=timeout):
        got.append(change)
        if ack_until is None or len(got) <= ack_until:
            feed.ack(change.position)
    feed.close()
    assert len(got) == count, f"only {len(got)} of {count} changes within {timeout} s"
    return got


def drain(feed, *, idle=0.5, timeout=60):
    """Everything ``feed`` has now (until ``idle`` seconds without a change once caught up with
    the server's WAL: see `feeds.drain`), acknowledged."""
    return feeds.drain(feed, idle=idle, timeout=timeout, close=True)


def insert_transaction(conn, first, count, prefix="row"):
    with conn.transaction():
        conn.execute(
            "INSERT INTO tasks SELECT g, %s || g FROM generate_series(%s::int, %s::int) g",
            [prefix + " ", first, first + count - 1],
        )


def ids(changes):
    return [c.key["id"] if hasattr(c, "key") else c["key"]["id"] for c in changes]


def wal_lsn(conn) -> int:
    """The server's current WAL insert position as a number (computed by PostgreSQL)."""
    return conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint").fetchone()[0]


# -- positions ---------------------------------------------------------------------------------


def test_positions_are_the_commit_lsn_and_the_index_in_the_transaction(pg_dsn, tasks):
    open_slot(pg_dsn)
    before = wal_lsn(tasks)
    insert_transaction(tasks, 0, ROWS)
    after = wal_lsn(tasks)
    insert_transaction(tasks, ROWS, 2)
    result = run_cli("run", "tasks", "--url", pg_dsn, "--format", "change", "-q",
                     "--limit", str(ROWS + 2))
    assert result.returncode == 0, result.stderr
    changes = json_lines(result.stdout)
    assert ids(changes) == list(range(ROWS + 2))
    positions = [c["position"] for c in changes]
    lsn = positions[0].split(":")[0]
    assert re.fullmatch(r"[0-9A-F]{16}", lsn) and before < int(lsn, 16) < after
    assert all(p.startswith(lsn + ":") for p in positions[:ROWS])
    assert [p.split(":")[1] for p in positions[:ROWS]][:3] == ["00000000", "00000001", "00000002"]
    suffixes = {index: positions[index].split(":")[1] for index in (9, 10, 15, 16, 17, 255, 256)}
    assert suffixes == {9: "00000009", 10: "0000000A", 15: "0000000F", 16: "00000010",
                        17: "00000011", 255: "000000FF", 256: "00000100"}
    assert positions[ROWS - 1] == lsn + ":0000012B"
    # The next transaction commits later: a greater LSN, its rows numbered from zero again.
    assert positions[ROWS].split(":")[1] == "00000000" and positions[ROWS] > positions[ROWS - 1]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


# -- acknowledgement ledger: restarts inside big transactions ----------------------------------


@pytest.mark.parametrize("delivered", [1, 9, 16, 17, 20, 255, 256, ROWS - 1])
def test_a_restart_from_the_checkpoint_inside_a_transaction_continues_exactly_after_it(
    pg_dsn, tasks, tmp_path, delivered
):
    checkpoint = tmp_path / "checkpoint.json"
    open_slot(pg_dsn)
    insert_transaction(tasks, 0, ROWS)
    first = read(make_feed(pg_dsn, checkpoint=FileCheckpoint(checkpoint)), delivered)
    assert ids(first) == list(range(delivered))

    again = drain(make_feed(pg_dsn, checkpoint=FileCheckpoint(checkpoint)))
    assert ids(again) == list(range(delivered, ROWS))  # not one row lost, none repeated


@pytest.mark.parametrize("delivered", [1, 17, ROWS - 1])
def test_a_partly_acknowledged_transaction_comes_again_whole_without_the_checkpoint(
    pg_dsn, tasks, delivered
):
    # The slot alone knows transaction boundaries only: the ledger must not move it to the end
    # of a transaction whose last change is not acknowledged.
    open_slot(pg_dsn)
    insert_transaction(tasks, 0, 20)
    insert_transaction(tasks, 20, ROWS)
    read(make_feed(pg_dsn), 20 + delivered)  # the first transaction and part of the second
    assert ids(drain(make_feed(pg_dsn))) == list(range(20, 20 + ROWS))


def test_the_ledger_moves_the_slot_past_each_transaction_fully_acknowledged(pg_dsn, tasks):
    open_slot(pg_dsn)
    for first in (0, 20, 40):
        insert_transaction(tasks, first, 20)
    # All of the first, none of the second, the third unread.
    read(make_feed(pg_dsn), 25, ack_until=20)
    assert ids(drain(make_feed(pg_dsn))) == list(range(20, 60))
    assert drain(make_feed(pg_dsn)) == []


@pytest.mark.parametrize("acknowledged", [1, 10, 19])
def test_the_ledger_keeps_a_transaction_read_past_its_commit_until_its_last_change_is_acked(
    pg_dsn, tasks, tmp_path, acknowledged
):
    # The consumer lags: the feed has read the commit of the first transaction (and rows of the
    # second) while the first transaction's last rows are still unacknowledged. The slot must
    # stay before that transaction; the checkpoint skips exactly what was acknowledged.
    checkpoint = tmp_path / "checkpoint.json"
    open_slot(pg_dsn)
    insert_transaction(tasks, 0, 20)
    insert_transaction(tasks, 20, ROWS)
    read(make_feed(pg_dsn, checkpoint=FileCheckpoint(checkpoint)), 40, ack_until=acknowledged)
    assert ids(drain(make_feed(pg_dsn, checkpoint=FileCheckpoint(checkpoint)))) == list(
        range(acknowledged, 20 + ROWS))


@pytest.mark.parametrize("acknowledged", [1, 10, 19])
def test_the_ledger_without_checkpoint_replays_a_transaction_read_past_its_commit(
    pg_dsn, tasks, acknowledged
):
    open_slot(pg_dsn)
    insert_transaction(tasks, 0, 20)
    insert_transaction(tasks, 20, ROWS)
    read(make_feed(pg_dsn), 40, ack_until=acknowledged)
    assert ids(drain(make_feed(pg_dsn))) == list(range(20 + ROWS))


def test_the_ledger_acknowledges_nothing_of_a_transaction_read_but_not_acknowledged(
    pg_dsn, tasks, tmp_path
):
    checkpoint = tmp_path / "checkpoint.json"
    open_slot(pg_dsn)
    insert_transaction(tasks, 0, 20)
    read(make_feed(pg_dsn, checkpoint=FileCheckpoint(checkpoint)), 20, ack_until=0)
    assert not checkpoint.exists()
    assert ids(drain(make_feed(pg_dsn, checkpoint=FileCheckpoint(checkpoint)))) == list(range(20))


def test_the_ledger_with_a_mask_that_drops_the_end_of_a_transaction(pg_dsn, tasks):
    # Written while the publication sent every operation, the transaction ends with updates the
    # INSERT feed drops: once its last emitted change is acknowledged, the slot moves past it.
    open_slot(pg_dsn)
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks SELECT g, 'a' FROM generate_series(0, 19) g")
        tasks.execute("UPDATE tasks SET title = 'b'")
    got = drain(make_feed(pg_dsn, Operation.INSERT))
    assert [(c.operation, c.key["id"]) for c in got] == [(Operation.INSERT, n) for n in range(20)]
    assert drain(make_feed(pg_dsn, Operation.INSERT)) == []
    tasks.execute("INSERT INTO tasks VALUES (20, 'c')")
    assert ids(drain(make_feed(pg_dsn, Operation.INSERT))) == [20]


# -- changefeed run: acknowledge only what was flushed -----------------------------------------


@pytest.mark.parametrize("pipeline", [[], ["--where", "id >= 0"]], ids=["fast", "pipeline"])
def test_the_cli_acknowledges_only_output_that_was_flushed(pg_dsn, tasks, tmp_path, pipeline):
    """The reader of stdout is stuck: the CLI's flush blocks, so nothing may be acknowledged.

    The test holds the pipe's write end too and fills the pipe before the rows are committed,
    so the CLI's lines stay in its own buffer and its flush blocks. It is then killed (as a
    crash would); a rerun from the checkpoint must still deliver every row. Both the fast path
    and a pipeline (whose stdout sink confirms a batch once it is flushed).
    """
    checkpoint = tmp_path / "checkpoint.json"
    args = ["run", "tasks", "--url", pg_dsn, "--format", "change", "--checkpoint",
            str(checkpoint), *pipeline]
    assert run_cli(*args, "--until-idle", "0.5").returncode == 0  # creates the slot
    read_end, write_end = os.pipe()
    try:
        # Python buffers stdout unless PYTHONUNBUFFERED is set (then a sink writing to
        # sys.stdout.buffer writes through and has nothing to flush): test the buffered case.
        with start_cli(*args, stdout=write_end, env={"PYTHONUNBUFFERED": None}) as process:
            process.wait_streaming()
            # A non-blocking write end of our own (O_NONBLOCK on write_end itself would make
            # the CLI's stdout non-blocking too: they share one open file description).
            filler = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK)
            try:
                capacity = fcntl.fcntl(filler, 1032)  # F_GETPIPE_SZ
                filled = os.write(filler, b"\n" * capacity)
                with pytest.raises(BlockingIOError):
                    os.write(filler, b"\n")
            finally:
                os.close(filler)
            insert_transaction(tasks, 0, 3)
            process.wait_blocked_writing()
            process.stop(signal.SIGKILL)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as reader:
            read_end = -1
            output = reader.read()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    assert filled == capacity and output[:capacity] == b"\n" * capacity
    written = json_lines(output[capacity:].decode())
    assert written == []  # the three rows never left the CLI's buffer
    assert not checkpoint.exists(), checkpoint.read_text()  # so nothing was acknowledged
    rerun = run_cli(*args, "--until-idle", "0.5", "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert ids(written) + ids(json_lines(rerun.stdout)) == [0, 1, 2]


# -- --limit inside a transaction --------------------------------------------------------------


def test_limit_inside_a_transaction_without_checkpoint_leaves_it_to_come_again(pg_dsn, tasks):
    args = ["run", "tasks", "--url", pg_dsn, "--format", "change", "-q"]
    assert run_cli(*args, "--until-idle", "0.5").returncode == 0
    insert_transaction(tasks, 0, 30)
    first = run_cli(*args, "--limit", "17")
    assert first.returncode == 0, first.stderr
    written = json_lines(first.stdout)
    assert ids(written) == list(range(17))
    assert [c["position"].split(":")[1] for c in written][15:] == ["0000000F", "00000010"]
    # The slot cannot stop inside a transaction: all of it comes again, nothing after it lost.
    insert_transaction(tasks, 30, 5)
    again = run_cli(*args, "--until-idle", "0.5")
    assert ids(json_lines(again.stdout)) == list(range(35))
    assert json_lines(run_cli(*args, "--until-idle", "0.5").stdout) == []


@pytest.mark.parametrize(
    "output", [[], ["--where", "id >= 0"], ["--where", "id >= 0", "--processes"]],
    ids=["lines", "pipeline", "processes"],
)
def test_limit_inside_a_transaction_with_checkpoint_continues_after_what_was_written(
    pg_dsn, tasks, tmp_path, output
):
    # The same delivery loop ends every kind of output at --limit: exactly what was written is
    # acknowledged, whatever the output.
    args = ["run", "tasks", "--url", pg_dsn, "--format", "change", "-q",
            "--checkpoint", str(tmp_path / "checkpoint.json"), *output]
    assert run_cli(*args, "--until-idle", "0.5").returncode == 0
    insert_transaction(tasks, 0, 30)
    insert_transaction(tasks, 30, 10)
    runs = [run_cli(*args, "--limit", "17") for _ in range(2)]
    runs.append(run_cli(*args, "--until-idle", "0.5"))
    runs.append(run_cli(*args, "--until-idle", "0.5"))
    assert [r.returncode for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]
    assert [ids(json_lines(r.stdout)) for r in runs] == [
        list(range(17)), list(range(17, 34)), list(range(34, 40)), []]


# -- a run that ends right after a transaction's last change ----------------------------------


def slot_state(conn) -> tuple[bool, int]:
    """(active, confirmed flush LSN) of the tasks feed's slot, as PostgreSQL has them now."""
    return conn.execute(
        "SELECT active, (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots"
        " WHERE slot_name = 'changefeed_tasks'"
    ).fetchone()


def commit_lsn(change) -> int:
    return int(change.position.split(":")[0], 16)


@pytest.mark.parametrize(
    "output", [[], ["--where", "id >= 0"], ["--where", "id >= 0", "--processes"]],
    ids=["lines", "pipeline", "processes"],
)
def test_limit_at_the_end_of_a_transaction_without_checkpoint_moves_the_slot_past_it(
    pg_dsn, tasks, output
):
    # --limit ends the run as the transaction's last change is handed out, before the feed read
    # its Commit: the slot alone must still pass that transaction, or every run repeats it.
    args = ["run", "tasks", "--url", pg_dsn, "--format", "change", "-q", *output]
    assert run_cli(*args, "--until-idle", "0.5").returncode == 0
    for key in range(3):
        tasks.execute("INSERT INTO tasks VALUES (%s, 'one')", [key])
    insert_transaction(tasks, 3, 5)
    with tasks.transaction():  # a message no run asks for, between the last row and the Commit
        tasks.execute("INSERT INTO tasks VALUES (8, 'then a message')")
        tasks.execute("SELECT pg_logical_emit_message(true, 'elsewhere', 'x')")
    runs = [run_cli(*args, "--limit", limit) for limit in ("1", "1", "1", "5", "1")]
    runs.append(run_cli(*args, "--until-idle", "0.5"))
    assert [r.returncode for r in runs] == [0] * 6, [r.stderr for r in runs]
    assert [ids(json_lines(r.stdout)) for r in runs] == [[0], [1], [2], [3, 4, 5, 6, 7], [8], []]


def test_when_close_returns_the_slot_has_the_last_acknowledgement_and_is_free(pg_dsn, tasks):
    # The feed ends the stream with the protocol's CopyDone and waits for the server's answer:
    # a status sent just before the connection closes could otherwise be lost with it, and a
    # run started at once could find the slot still in use.
    open_slot(pg_dsn)
    feed = make_feed(pg_dsn)
    for key in range(10):
        tasks.execute("INSERT INTO tasks VALUES (%s, 'x')", [key])
        (change,) = read(feed, 1)  # acknowledged, then the feed closed
        active, confirmed = slot_state(tasks)
        assert not active and confirmed > commit_lsn(change), key
    assert drain(make_feed(pg_dsn)) == []


def test_a_stop_request_right_after_a_change_leaves_nothing_to_repeat(pg_dsn, tasks):
    open_slot(pg_dsn)
    for key in range(5):
        feed = make_feed(pg_dsn)
        tasks.execute("INSERT INTO tasks VALUES (%s, 'x')", [key])
        for change in feed.changes(timeout=30):
            feed.ack(change.position)
            feed.stop()  # as a signal handler does; the loop ends at once
        feed.close()
        assert ids([change]) == [key]
    assert drain(make_feed(pg_dsn)) == []


# -- the publication follows --ops on a reused slot --------------------------------------------


def publish_flags(conn) -> tuple[bool, bool, bool]:
    return conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication"
        " WHERE pubname = 'changefeed_tasks'"
    ).fetchone()


def run_writing(dsn, conn, ops, writes, until_key, until_type):
    """Run ``changefeed run --ops OPS``; once it streams, make ``writes``; read until the delta
    of type ``until_type`` for row ``until_key``; stop. Returns (operation, id) per delta."""
    with start_cli("run", "tasks", "--url", dsn, "--ops", ops) as process:
        process.wait_streaming()
        for statement in writes:
            conn.execute(statement)
        got = []
        while not got or got[-1] != (until_type, until_key):
            delta = process.read_json(1)[0]
            row = delta.get("data") or delta["newData"]
            got.append((delta["type"], row["id"]))
        returncode, rest = process.stop()
    assert returncode == 0 and rest == "", process.stderr
    return got


ONE_OF_EACH = ["INSERT INTO tasks VALUES ({0}, 'x')", "UPDATE tasks SET title = 'y' WHERE id = {0}",
               "DELETE FROM tasks WHERE id = {0}"]


def one_of_each(key):
    return [statement.format(key) for statement in ONE_OF_EACH]


def test_ops_widened_then_narrowed_on_a_reused_slot(pg_dsn, tasks):
    got = run_writing(pg_dsn, tasks, "insert", [*one_of_each(1), *one_of_each(2)], 2, "insert")
    assert got == [("insert", 1), ("insert", 2)]
    assert publish_flags(tasks) == (True, False, False)

    got = run_writing(pg_dsn, tasks, "insert,update,delete", one_of_each(3), 3, "delete")
    assert got == [("insert", 3), ("update", 3), ("delete", 3)]
    assert publish_flags(tasks) == (True, True, True)

    got = run_writing(pg_dsn, tasks, "delete", [*one_of_each(4), *one_of_each(5)], 5, "delete")
    assert got == [("delete", 4), ("delete", 5)]
    assert publish_flags(tasks) == (False, False, True)

    got = run_writing(pg_dsn, tasks, "update,insert", [*one_of_each(6), *one_of_each(7)], 7,
                      "update")
    assert got == [("insert", 6), ("update", 6), ("insert", 7), ("update", 7)]
    assert publish_flags(tasks) == (True, True, False)
    slots = tasks.execute("SELECT slot_name FROM pg_replication_slots").fetchall()
    assert slots == [("changefeed_tasks",)]  # one slot, reused by every run


# -- exit codes --------------------------------------------------------------------------------


def test_exit_2_for_usage_and_configuration(pg_dsn, tasks):
    assert_exit(run_cli("run", "nope", "--url", pg_dsn), 2, "table 'nope' does not exist")
    assert_exit(run_cli("run", "tasks", "--url", "mysql://localhost/db"), 2, "unsupported URL")
    assert_exit(run_cli("run", "tasks", "--url", pg_dsn, "--where", "title ==="), 2,
                "cannot read --where")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--ops", "upsert")
    assert result.returncode == 2 and "unknown operation 'upsert'" in result.stderr


def test_exit_3_for_an_unreachable_server():
    url = f"postgresql://postgres@127.0.0.1:{refused_port()}/postgres"
    assert_exit(run_cli("run", "tasks", "--url", url), 3, "cannot connect to PostgreSQL")


def test_exit_3_for_a_role_without_the_replication_privilege(pg_dsn, tasks):
    tasks.execute("CREATE ROLE no_replication LOGIN")
    url = pg_dsn.replace("postgres@", "no_replication@")
    assert_exit(run_cli("run", "tasks", "--url", url), 3, "lacks the REPLICATION privilege")


def test_exit_3_and_exit_4_on_servers_of_their_own():
    """wal_level not logical (3), then a slot invalidated because its WAL was removed (4)."""
    with TemporaryPostgres(settings={"wal_level": "replica"}) as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE tasks (id int PRIMARY KEY)")
        assert_exit(run_cli("run", "tasks", "--url", server.dsn()), 3, "wal_level is 'replica'")

    with TemporaryPostgres(settings={"max_slot_wal_keep_size": "1MB"}) as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE tasks (id int PRIMARY KEY, pad text)")
            assert run_cli("run", "tasks", "--url", server.dsn(), "--until-idle",
                           "0.5").returncode == 0
            for _ in range(20):  # write and switch WAL past the slot's reserve, then checkpoint
                status = conn.execute(
                    "SELECT wal_status FROM pg_replication_slots"
                    " WHERE slot_name = 'changefeed_tasks'"
                ).fetchone()[0]
                if status == "lost":
                    break
                conn.execute("INSERT INTO tasks SELECT g, repeat('x', 1000)"
                             " FROM generate_series(1, 3000) g ON CONFLICT (id) DO NOTHING")
                conn.execute("DELETE FROM tasks")
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
            assert status == "lost", "the slot was never invalidated"
        result = run_cli("run", "tasks", "--url", server.dsn())
        assert_exit(result, 4, "slot changefeed_tasks was invalidated", "--prefeed snapshot")


def test_exit_5_when_a_stage_fails_and_what_failed_is_not_acknowledged(pg_dsn, tasks, tmp_path):
    # A subscription needs the old row (REPLICA IDENTITY FULL) to judge an update: without it
    # the stage fails; what came before is delivered and acknowledged, the update is not.
    args = ["run", "tasks", "--url", pg_dsn, "--filter", '["==", "title", "blue"]',
            "--until-idle", "0.5", "--checkpoint", str(tmp_path / "checkpoint.json")]
    assert run_cli(*args).returncode == 0  # creates the slot
    tasks.execute("INSERT INTO tasks VALUES (1, 'blue')")
    tasks.execute("UPDATE tasks SET title = 'red' WHERE id = 1")
    first, second = run_cli(*args), run_cli(*args)
    assert_exit(first, 5, "REPLICA IDENTITY FULL")
    assert json_lines(first.stdout) == [
        {"type": "insert", "model": "tasks", "data": {"id": 1, "title": "blue"}}]
    assert_exit(second, 5, "REPLICA IDENTITY FULL")  # the failed update comes again
    assert json_lines(second.stdout) == []


# -- TRUNCATE: an event, positioned and acknowledged like a change -----------------------------


def read_items(feed, count, *, timeout=60):
    """``count`` items (changes and truncates), each acknowledged; the stream closed after."""
    got = []
    for item in feed.changes(limit=count, timeout=timeout):
        got.append(item)
        feed.ack(item.position)
    feed.close()
    assert len(got) == count, f"only {len(got)} of {count} items within {timeout} s"
    return got


def kinds(items):
    return [(item.operation.name.lower(), item.table, getattr(item, "key", None)) for item in items]


def test_truncate_is_an_item_between_the_changes_around_it(pg_dsn, tasks):
    tasks.execute("CREATE TABLE other (id int PRIMARY KEY)")
    feed = PostgresChangeFeed(["tasks", "other"], connection=pg_dsn,
                              retry=Retry(initial=0.05, maximum=0.5))
    assert list(feed.changes(timeout=0.5)) == []
    tasks.execute("INSERT INTO tasks VALUES (1, 'a'), (2, 'b'); INSERT INTO other VALUES (1)")
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks VALUES (3, 'c')")
        tasks.execute("TRUNCATE tasks, other RESTART IDENTITY")
        tasks.execute("INSERT INTO tasks VALUES (4, 'd')")
    items = read_items(feed, 7)
    assert kinds(items) == [
        ("insert", "public.tasks", {"id": 1}), ("insert", "public.tasks", {"id": 2}),
        ("insert", "public.other", {"id": 1}),
        ("insert", "public.tasks", {"id": 3}), ("truncate", "public.tasks", None),
        ("truncate", "public.other", None), ("insert", "public.tasks", {"id": 4}),
    ]
    last = items[3:]
    assert [PgPosition.parse(i.position).index for i in last] == [0, 1, 2, 3]
    assert len({PgPosition.parse(i.position).lsn for i in last}) == 1
    assert [i.position for i in items] == sorted(i.position for i in items)
    assert all(t.restart_identity and not t.cascade for t in last[1:3])
    assert last[1].transaction == last[0].transaction and last[1].committed_at is not None


def test_truncate_cascade_names_every_table_it_emptied(pg_dsn, tasks):
    tasks.execute("CREATE TABLE parent (id int PRIMARY KEY)")
    tasks.execute("CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent)")
    feed = PostgresChangeFeed(["parent", "child"], connection=pg_dsn,
                              retry=Retry(initial=0.05, maximum=0.5))
    assert list(feed.changes(timeout=0.5)) == []
    tasks.execute("INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1)")
    tasks.execute("TRUNCATE parent CASCADE")
    items = read_items(feed, 4)
    assert kinds(items)[2:] == [("truncate", "public.parent", None),
                                ("truncate", "public.child", None)]
    assert all(t.cascade for t in items[2:])


def test_truncate_of_a_partitioned_root_is_one_item_for_the_root(pg_dsn, tasks):
    tasks.execute("CREATE TABLE m (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k)")
    tasks.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
    tasks.execute("CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (10) TO (20)")
    feed = PostgresChangeFeed("m", connection=pg_dsn, retry=Retry(initial=0.05, maximum=0.5))
    assert list(feed.changes(timeout=0.5)) == []
    tasks.execute("INSERT INTO m VALUES (1, 1), (2, 15)")
    tasks.execute("TRUNCATE m")
    # PostgreSQL does not publish the TRUNCATE of one partition when changes are published
    # through the root (as changefeed publishes them): the README says so.
    tasks.execute("INSERT INTO m VALUES (3, 3), (4, 16)")
    tasks.execute("TRUNCATE m1")
    tasks.execute("INSERT INTO m VALUES (5, 5)")
    items = read_items(feed, 6)
    assert kinds(items) == [
        ("insert", "public.m", {"id": 1, "k": 1}), ("insert", "public.m", {"id": 2, "k": 15}),
        ("truncate", "public.m", None),
        ("insert", "public.m", {"id": 3, "k": 3}), ("insert", "public.m", {"id": 4, "k": 16}),
        ("insert", "public.m", {"id": 5, "k": 5}),
    ]


def test_a_truncate_acknowledged_is_not_repeated_and_one_not_acknowledged_is(pg_dsn, tasks):
    open_slot(pg_dsn)
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks VALUES (1, 'a')")
        tasks.execute("TRUNCATE tasks")
        tasks.execute("INSERT INTO tasks VALUES (2, 'b')")
    checkpoint = MemoryCheckpoint()  # kept across the feeds, as a file across runs
    # Not acknowledged: the truncate comes again.
    got = read(make_feed(pg_dsn, checkpoint=checkpoint), 2, ack_until=1)
    assert [i.operation for i in got] == [Operation.INSERT, Operation.TRUNCATE]
    again = read(make_feed(pg_dsn, checkpoint=checkpoint), 2)
    assert [i.operation for i in again] == [Operation.TRUNCATE, Operation.INSERT]
    assert again[0].position == got[1].position
    # Acknowledged (with everything before it): the next run starts after it.
    tasks.execute("INSERT INTO tasks VALUES (3, 'c')")
    after = read(make_feed(pg_dsn, checkpoint=checkpoint), 1)
    assert after[0].new == {"id": 3, "title": "c"}


FORMATS = ("change", "delta", "debezium")


def test_truncate_in_every_format_on_the_command_line(pg_dsn, tasks):
    for fmt in FORMATS:  # a slot of its own per format, made before the writes
        assert run_cli("run", "tasks", "--url", pg_dsn, "--slot", f"s_{fmt}",
                       "--until-idle", "0.5").returncode == 0
    tasks.execute("INSERT INTO tasks VALUES (1, 'a')")
    tasks.execute("TRUNCATE tasks CASCADE")
    tasks.execute("INSERT INTO tasks VALUES (2, 'b')")
    lines = {}
    for fmt in FORMATS:
        result = run_cli("run", "tasks", "--url", pg_dsn, "--slot", f"s_{fmt}", "--format", fmt,
                         "--until-idle", "0.5")
        assert result.returncode == 0, result.stderr
        lines[fmt] = json_lines(result.stdout)
        assert len(lines[fmt]) == 3, (fmt, result.stdout, result.stderr)

    change = lines["change"]
    assert [line["operation"] for line in change] == ["insert", "truncate", "insert"]
    truncate = change[1]
    assert set(truncate) == {"operation", "table", "position", "committed_at", "transaction",
                             "cascade", "restart_identity"}
    assert truncate["table"] == "public.tasks" and truncate["cascade"] is True
    assert change[0]["position"] < truncate["position"] < change[2]["position"]

    assert lines["delta"][1] == {"type": "truncate", "model": "tasks"}

    event = lines["debezium"][1]
    assert event["op"] == "t" and event["before"] is None and event["after"] is None
    assert event["source"]["table"] == "tasks" and event["source"]["schema"] == "public"
    assert event["source"]["txId"] == truncate["transaction"]
    assert event["transaction"]["total_order"] == PgPosition.parse(truncate["position"]).index + 1


def test_truncate_left_out_by_ops_is_said_on_stderr_and_positions_do_not_move(pg_dsn, tasks):
    for ops in ("all", "insert,update,delete"):
        assert run_cli("run", "tasks", "--url", pg_dsn, "--slot", f"s_{ops.count(',')}",
                       "--ops", ops, "--until-idle", "0.5").returncode == 0
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks VALUES (1, 'a')")
        tasks.execute("TRUNCATE tasks")
        tasks.execute("INSERT INTO tasks VALUES (2, 'b')")
    everything = run_cli("run", "tasks", "--url", pg_dsn, "--slot", "s_0", "--format",
                         "change", "--until-idle", "0.5")
    rows_only = run_cli("run", "tasks", "--url", pg_dsn, "--slot", "s_2", "--ops",
                        "insert,update,delete", "--format", "change", "--until-idle", "0.5")
    all_lines, row_lines = json_lines(everything.stdout), json_lines(rows_only.stdout)
    assert [line["operation"] for line in all_lines] == ["insert", "truncate", "insert"]
    assert row_lines == [all_lines[0], all_lines[2]]  # the same positions, the truncate out
    assert "TRUNCATE of public.tasks is not emitted" in rows_only.stderr
    assert "not emitted" not in everything.stderr


@pytest.mark.parametrize("processes", [[], ["--processes"]], ids=["in-process", "processes"])
def test_truncate_through_a_pipeline_with_where_filter_and_a_file_sink(pg_dsn, tasks, tmp_path,
                                                                        processes):
    tasks.execute("ALTER TABLE tasks REPLICA IDENTITY FULL")
    open_slot(pg_dsn)
    tasks.execute("INSERT INTO tasks VALUES (1, 'a'), (2, 'b')")
    tasks.execute("TRUNCATE tasks")
    tasks.execute("INSERT INTO tasks VALUES (3, 'a')")
    sink = tmp_path / "out.jsonl"
    result = run_cli("run", "tasks", "--url", pg_dsn, "--where", 'title == "a"', "--filter",
                     '["==", "title", "a"]', "--format", "change", "--sink", str(sink),
                     "--until-idle", "0.5", *processes)
    assert result.returncode == 0, result.stderr
    got = [(line["operation"], (line.get("new") or {}).get("id")) for line in
           json_lines(sink.read_text())]
    assert got == [("insert", 1), ("truncate", None), ("insert", 3)]


def apply_in_order(rows: dict, item) -> None:
    """What a consumer keeping a copy of a table does with each item."""
    if item.operation is Operation.TRUNCATE:
        rows.clear()
    elif item.operation is Operation.DELETE:
        rows.pop(item.key["id"], None)
    else:
        rows[item.key["id"]] = item.new


def test_truncates_while_a_chunked_snapshot_is_read_leave_the_consumer_equal_to_the_table(
    pg_dsn, tasks
):
    tasks.execute("INSERT INTO tasks SELECT g, 'old' FROM generate_series(1, 6000) g")
    stop = threading.Event()

    def truncate_and_refill():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            round_ = 0
            while not stop.is_set():
                round_ += 1
                first = 10_000 * round_
                with conn.transaction():
                    conn.execute("TRUNCATE tasks")
                    conn.execute("INSERT INTO tasks SELECT g, 'new'"
                                 " FROM generate_series(%s::int, %s::int) g", [first, first + 300])
                time.sleep(0.03)  # the writer's pace

    feed = make_feed(pg_dsn, prefeed="snapshot", chunk_size=100)
    writer = threading.Thread(target=truncate_and_refill)
    rows: dict = {}
    truncates = 0
    try:
        for item in feed.changes(timeout=120, idle_timeout=3):
            if item.snapshot and writer.ident is None:
                writer.start()  # once the snapshot is under way
            truncates += item.operation is Operation.TRUNCATE
            if truncates >= 20:
                stop.set()
            apply_in_order(rows, item)
            feed.ack(item.position)
    finally:
        stop.set()
        if writer.ident is not None:
            writer.join()
    assert truncates >= 20
    assert rows == {row[0]: {"id": row[0], "title": row[1]}
                    for row in tasks.execute("SELECT id, title FROM tasks")}


def test_a_truncate_between_a_chunks_read_and_its_watermark_empties_the_chunk(
    pg_dsn, tasks, monkeypatch
):
    # The chunk's rows are read, then the table is truncated and refilled, then the chunk's
    # high watermark is written: the chunk's rows are older than the truncate before them.
    from changefeed.backends.postgres.backfill import Backfills

    tasks.execute("INSERT INTO tasks SELECT g, 'old' FROM generate_series(1, 1000) g")
    emit = Backfills._emit  # private: the moment between a chunk's read and its watermark
    chunks = []

    def truncate_then_emit(self, conn, watermark, mark):
        chunks.append(watermark)
        if len(chunks) == 3:
            with psycopg.connect(pg_dsn, autocommit=True) as other, other.transaction():
                other.execute("TRUNCATE tasks")
                other.execute("INSERT INTO tasks VALUES (5000, 'new')")
        emit(self, conn, watermark, mark)

    monkeypatch.setattr(Backfills, "_emit", truncate_then_emit)
    feed = make_feed(pg_dsn, prefeed="snapshot", chunk_size=100)
    rows: dict = {}
    for item in feed.changes(timeout=120, idle_timeout=3):
        apply_in_order(rows, item)
        feed.ack(item.position)
    assert len(chunks) >= 3
    assert rows == {5000: {"id": 5000, "title": "new"}}
