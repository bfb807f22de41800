"""The PostgreSQL feed against a real server (started by tests/conftest.py)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal

import psycopg
import pytest
from feeds import drain, make_feed, start
from testservers import fast_stop_then_start
from waiting import wait_until

from changefeed import (
    ALL,
    UNCHANGED,
    ConfigurationError,
    MemoryCheckpoint,
    Operation,
    PermanentBackendError,
    get_changefeed,
)
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.backends.postgres import feed as feed_module
from changefeed.backends.postgres import stream as stream_module
from changefeed.backends.postgres.pacing import ReadPacing

pytestmark = pytest.mark.postgres

@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id serial PRIMARY KEY, title text, done boolean DEFAULT false)")
    return pg


def write_one_of_each(conn):
    conn.execute("INSERT INTO tasks (title) VALUES ('a')")
    conn.execute("UPDATE tasks SET done = true WHERE title = 'a'")
    conn.execute("DELETE FROM tasks WHERE title = 'a'")


@pytest.mark.parametrize("mask", range(1, 8))
def test_each_operation_and_every_combined_mask(pg_dsn, tasks, mask):
    feed = make_feed(pg_dsn, operation=mask)
    start(feed)
    write_one_of_each(tasks)
    got = [c.operation for c in drain(feed)]
    expected = [op for op in (Operation.INSERT, Operation.UPDATE, Operation.DELETE) if op & mask]
    assert got == expected


def test_publication_publishes_only_the_selected_operations(pg_dsn, tasks):
    start(make_feed(pg_dsn, operation=Operation.INSERT | Operation.DELETE))
    row = tasks.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication"
        " WHERE pubname = 'changefeed_tasks'"
    ).fetchone()
    assert row == (True, False, True, True)  # truncate too: it is reported, never streamed
    tables = tasks.execute(
        "SELECT tablename FROM pg_publication_tables WHERE pubname = 'changefeed_tasks'"
    ).fetchall()
    assert tables == [("tasks",)]


def test_prefeed_iterable_comes_first(pg_dsn, tasks):
    feed = make_feed(pg_dsn, prefeed=["first", "second"])
    start(make_feed(pg_dsn))
    tasks.execute("INSERT INTO tasks (title) VALUES ('x')")
    got = list(feed.changes(limit=3, timeout=10))
    assert got[:2] == ["first", "second"] and got[2].new["title"] == "x"


def test_get_changefeed_dispatches_on_url_and_on_a_psycopg_connection(pg_dsn, tasks):
    assert isinstance(get_changefeed(pg_dsn, "tasks", ALL), PostgresChangeFeed)
    feed = get_changefeed(tasks, "tasks", Operation.INSERT, slot="changefeed_from_conn")
    start(feed)
    tasks.execute("INSERT INTO tasks (title) VALUES ('via connection')")
    assert [c.new["title"] for c in drain(feed)] == ["via connection"]


def test_values_become_python_values_and_unchanged_toast_is_a_sentinel(pg_dsn, pg):
    pg.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    pg.execute(
        "CREATE TABLE v (id int PRIMARY KEY, i int, b bigint, n numeric, t text, f boolean,"
        " at timestamptz, d date, u uuid, j jsonb, arr text[], bin bytea, m mood, nothing int,"
        " big text)"
    )
    feed = make_feed(pg_dsn, "v")
    start(feed)
    pg.execute(
        "INSERT INTO v VALUES (1, -7, 9223372036854775807, 0.1, 'x', false,"
        " '2030-01-02 03:04:05+00', '1999-12-31', '6ba7b810-9dad-11d1-80b4-00c04fd430c8',"
        " '{\"a\": {\"b\": [true]}}', ARRAY['p', NULL, 'q,r'], '\\xdeadbeef', 'sad', NULL,"
        " (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 500) g))"
    )
    pg.execute("UPDATE v SET i = 8 WHERE id = 1")
    insert, update = drain(feed)
    assert insert.new == {
        "id": 1, "i": -7, "b": 9223372036854775807, "n": Decimal("0.1"), "t": "x", "f": False,
        "at": datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "d": date(1999, 12, 31),
        "u": uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8"), "j": {"a": {"b": [True]}},
        "arr": ["p", None, "q,r"], "bin": b"\xde\xad\xbe\xef", "m": "sad", "nothing": None,
        "big": insert.new["big"],
    }
    assert len(insert.new["big"]) == 500 * 32
    assert update.new["i"] == 8 and update.new["big"] is UNCHANGED
    assert update.new["nothing"] is None  # a real NULL stays None


def test_timestamps_come_in_utc_whatever_the_server_time_zone(pg_dsn, pg):
    # Aware datetimes in UTC, from the snapshot and from the stream alike, so the JSON output
    # does not depend on how the server (or the database, or the role) sets TimeZone.
    pg.execute(f"ALTER DATABASE {pg.info.dbname} SET TimeZone = 'America/New_York'")
    pg.execute("CREATE TABLE ts (id int PRIMARY KEY, at timestamptz)")
    pg.execute("INSERT INTO ts VALUES (1, '2030-01-02 03:04:05.25+00')")
    feed = make_feed(pg_dsn, "ts", prefeed="snapshot")
    (snapshot,) = drain(feed)
    pg.execute("INSERT INTO ts VALUES (2, '2030-07-01 12:00:00-07')")
    (streamed,) = drain(feed)
    assert snapshot.new["at"] == datetime(2030, 1, 2, 3, 4, 5, 250000, tzinfo=timezone.utc)
    assert streamed.new["at"] == datetime(2030, 7, 1, 19, 0, tzinfo=timezone.utc)
    assert snapshot.new["at"].tzinfo is timezone.utc
    assert streamed.new["at"].tzinfo is timezone.utc
    assert streamed.committed_at.tzinfo is timezone.utc


def test_replica_identity_full_gives_the_old_row_and_fills_unchanged_values(pg_dsn, pg):
    pg.execute("CREATE TABLE f (id int PRIMARY KEY, note text, big text)")
    pg.execute("ALTER TABLE f REPLICA IDENTITY FULL")
    feed = make_feed(pg_dsn, "f", Operation.UPDATE)
    start(feed)
    pg.execute(
        "INSERT INTO f VALUES (1, 'a', (SELECT string_agg(md5(g::text), '')"
        " FROM generate_series(1, 500) g))"
    )
    pg.execute("UPDATE f SET note = 'b'")
    (update,) = drain(feed)
    assert update.old["note"] == "a" and update.new["note"] == "b"
    assert update.new["big"] == update.old["big"] and len(update.new["big"]) == 16000
    assert update.key == {"id": 1}


def snapshot_while_writing(pg_dsn, pg, feed, *, strict: bool) -> tuple[dict, dict, int]:
    """Read ``feed`` (a snapshot prefeed of table s) while a writer inserts, updates and
    deletes; apply each change to a dict as a consumer would. Returns the consumer's state,
    the table's rows when the writer stopped, and the number of snapshot rows.

    ``strict``: no row may come twice and no change may name a row not seen (the exported
    snapshot's promise). Otherwise (chunked snapshots) a delete may name a row whose chunk was
    not read yet, and a snapshot row may repeat a row the stream gave, with the same values.
    """
    stop = threading.Event()

    def writer():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            next_id = 20001
            while not stop.is_set():
                conn.execute("INSERT INTO s VALUES (%s, 0)", [next_id])
                conn.execute("UPDATE s SET v = v + 1 WHERE id = %s", [next_id % 20000 + 1])
                conn.execute("DELETE FROM s WHERE id = %s", [next_id - 19990])
                next_id += 1

    thread = threading.Thread(target=writer)
    thread.start()
    state: dict[int, int] = {}
    snapshot_rows = 0
    final = None
    try:
        # To the end of the snapshot: chunks keep coming after the marker, until idle.
        for change in feed.changes(timeout=120, idle_timeout=3):
            key = change.row["id"]
            if key == -1:
                feed.ack(change.position)
                if strict:
                    break
                continue
            if change.snapshot:
                snapshot_rows += 1
            elif final is None and snapshot_rows >= 15000:
                # Well into the snapshot: stop the writer and note what the table holds.
                stop.set()
                thread.join()
                final = dict(pg.execute("SELECT id, v FROM s").fetchall())
                pg.execute("INSERT INTO s VALUES (-1, -1)")  # the end marker
            if change.operation == Operation.INSERT:
                if strict or not change.snapshot:
                    assert key not in state, f"row {key} inserted twice"
                else:
                    assert state.get(key, change.new["v"]) == change.new["v"], (
                        f"snapshot row {key} overwrote a newer change"
                    )
                state[key] = change.new["v"]
            elif change.operation == Operation.UPDATE:
                assert key in state or not strict, f"update of row {key} never seen"
                state[key] = change.new["v"]
            else:
                found = state.pop(key, None)
                assert found is not None or not strict, f"delete of unseen row {key}"
            feed.ack(change.position)
    finally:
        stop.set()
        thread.join()
    assert final is not None, "the snapshot ended before the writer was stopped"
    return state, final, snapshot_rows


def test_chunked_snapshot_while_a_writer_runs_leaves_the_consumer_with_the_table(pg_dsn, pg):
    pg.execute("CREATE TABLE s (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO s SELECT g, 0 FROM generate_series(1, 20000) g")
    feed = make_feed(pg_dsn, "s", prefeed="snapshot", chunk_size=1000)
    state, final, snapshot_rows = snapshot_while_writing(pg_dsn, pg, feed, strict=False)
    assert snapshot_rows >= 15000
    assert state == final


@pytest.mark.parametrize("how", ["chunked by ctid", "exported"])
def test_snapshot_of_a_table_without_key_while_a_writer_runs(pg_dsn, pg, monkeypatch, how):
    # Without a key the table is read in chunks by ctid, whole rows as keys; the exported
    # snapshot (servers before 14) reads it at once: nothing comes twice, nothing is missed.
    if how == "exported":
        monkeypatch.setattr(feed_module, "in_chunks", lambda version, tables: False)
    pg.execute("CREATE TABLE s (id int NOT NULL, v int)")
    pg.execute("ALTER TABLE s REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO s SELECT g, 0 FROM generate_series(1, 20000) g")
    feed = make_feed(pg_dsn, "s", prefeed="snapshot", chunk_size=1000)
    state, final, snapshot_rows = snapshot_while_writing(pg_dsn, pg, feed,
                                                         strict=how == "exported")
    assert snapshot_rows >= (20000 if how == "exported" else 15000)
    assert state == final


def test_the_idle_check_queries_the_server_only_once_a_reader_asks_whether_it_is_caught_up(
    pg_dsn, tasks
):
    # Its query is a round trip that holds up the stream loop and the changes behind it: a
    # reader without an idle timeout never pays for it; one with it stops once caught up.
    feed = make_feed(pg_dsn)
    start(feed)
    for title in ("a", "b", "c"):
        tasks.execute("INSERT INTO tasks (title) VALUES (%s)", [title])
    first = []
    for change in feed.changes(limit=3, timeout=20):
        first.append(change.new["title"])
        feed.ack(change.position)
    assert first == ["a", "b", "c"]
    assert feed._idle.target is None and not feed._idle.wanted
    tasks.execute("INSERT INTO tasks (title) VALUES ('d')")
    started = time.monotonic()
    assert [c.new["title"] for c in drain(feed, idle=0.5, timeout=20)] == ["d"]
    assert time.monotonic() - started < 15  # it ended by being idle, not at the timeout
    assert feed._idle.wanted and feed._idle.target is not None
    feed.close()


@pytest.mark.parametrize("lost", ["plain", "all"])
def test_a_connection_lost_when_a_reader_first_asks_whether_caught_up_is_not_an_error(
    pg_dsn, pg, tasks, lost
):
    """The first question starts the idle check with a query on the plain connection, outside
    the stream loop's reconnects: a connection ended under it (the plain one alone, or every
    one of the feed's) means "not caught up" and the loop reconnects, never a traceback."""
    feed = make_feed(pg_dsn)
    start(feed)
    tasks.execute("INSERT INTO tasks (title) VALUES ('a')")
    changes = feed.changes(timeout=20)
    change = next(changes)
    feed.ack(change.position)
    assert change.new["title"] == "a" and not feed._idle.wanted
    pids = [feed._sql.info.backend_pid]
    if lost == "all":
        pids += [row[0] for row in pg.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", [feed.slot])]
    pg.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])
    wait_until(lambda: not pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid ="
                                      " ANY(%s)", [pids]).fetchone()[0], "the backends ended")
    assert feed.caught_up is False
    tasks.execute("INSERT INTO tasks (title) VALUES ('b')")
    change = next(changes)
    assert change.new["title"] == "b"
    feed.ack(change.position)
    changes.close()
    assert [c.new["title"] for c in drain(feed, close=True)] == []


def test_several_rows_in_one_transaction_and_acknowledging_part_of_it(pg_dsn, tasks):
    checkpoint = MemoryCheckpoint()
    feed = make_feed(pg_dsn, checkpoint=checkpoint)
    start(feed)
    with tasks.transaction():
        for title in ("one", "two", "three"):
            tasks.execute("INSERT INTO tasks (title) VALUES (%s)", [title])
    changes = list(feed.changes(limit=3, timeout=10))
    assert len({c.position for c in changes}) == 3
    assert len({c.position.split(":")[0] for c in changes}) == 1  # one commit LSN
    feed.ack(changes[0].position)  # only the first row is delivered, then we crash
    feed.close()

    # The slot did not move past the transaction; the checkpoint skips what was delivered.
    again = make_feed(pg_dsn, checkpoint=checkpoint)
    assert [c.new["title"] for c in drain(again)] == ["two", "three"]
    # Without the checkpoint the whole transaction comes again: at least once, never less.
    fresh = make_feed(pg_dsn)
    assert [c.new["title"] for c in drain(fresh)] == []  # `again` acknowledged it all


def test_unacknowledged_transaction_is_replayed_whole(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    with tasks.transaction():
        tasks.execute("INSERT INTO tasks (title) VALUES ('a'), ('b')")
    assert len(list(feed.changes(limit=2, timeout=10))) == 2
    feed.close()  # nothing acknowledged
    assert [c.new["title"] for c in drain(make_feed(pg_dsn))] == ["a", "b"]


def test_an_acknowledgement_after_the_stream_closed_still_moves_the_slot(pg_dsn, tasks):
    # A consumer stopped by a signal or an idle timeout leaves changes() (which closes the
    # stream) before it flushes and acknowledges its last output: that ack must not be lost.
    feed = make_feed(pg_dsn)
    start(feed)
    tasks.execute("INSERT INTO tasks (title) VALUES ('a'), ('b')")
    got = list(feed.changes(idle_timeout=1, timeout=20))
    assert [c.new["title"] for c in got] == ["a", "b"]
    feed.ack(got[-1].position)  # the stream is closed by now
    feed.close()  # as every consumer does after its last ack: close() records it on the slot
    tasks.execute("INSERT INTO tasks (title) VALUES ('c')")
    again = make_feed(pg_dsn)  # a new process would start like this
    assert [c.new["title"] for c in drain(again)] == ["c"]


def test_resume_after_close_continues_where_acknowledged(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    tasks.execute("INSERT INTO tasks (title) VALUES ('before')")
    assert [c.new["title"] for c in drain(feed)] == ["before"]
    feed.close()
    tasks.execute("INSERT INTO tasks (title) VALUES ('while away')")
    assert [c.new["title"] for c in drain(make_feed(pg_dsn))] == ["while away"]


def test_reconnects_when_the_walsender_is_terminated_and_loses_nothing(pg_dsn, tasks):
    feed = make_feed(pg_dsn)
    start(feed)
    done = threading.Event()

    def writer():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for number in range(300):
                conn.execute("INSERT INTO tasks (title) VALUES (%s)", [str(number)])
                if number in (100, 200):
                    conn.execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                        " WHERE slot_name = 'changefeed_tasks' AND active"
                    )
                time.sleep(0.002)  # the writer's pace
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    titles = []
    for change in feed.changes(timeout=60):
        titles.append(change.new["title"])
        feed.ack(change.position)
        if done.is_set() and len(set(titles)) == 300:
            break
    thread.join()
    assert set(titles) == {str(n) for n in range(300)}
    assert feed.stats.reconnects >= 1
    assert len(titles) == 300, "acknowledged changes are not delivered again"


def test_idle_feed_lets_the_slot_advance(pg_dsn, tasks):
    tasks.execute("CREATE TABLE other (x int)")
    feed = make_feed(pg_dsn, status_interval=0.2)
    start(feed)
    tasks.execute("INSERT INTO tasks (title) VALUES ('x')")
    assert len(drain(feed)) == 1
    for _ in range(50):
        tasks.execute("INSERT INTO other VALUES (1)")  # WAL the feed does not publish
    end = tasks.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    drain(feed, idle=3.0)
    confirmed = tasks.execute(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'changefeed_tasks'"
    ).fetchone()[0]
    assert confirmed >= end


def test_a_live_stream_asks_the_socket_how_much_waits_only_while_it_reads_a_backlog(
    pg_dsn, tasks, monkeypatch
):
    # Read pacing needs to know how many bytes wait in the socket (a FIONREAD) only for
    # transactions the server sent long after their commit; a live stream's wake-up is one
    # poll and one read, also when its consumer idled longer than that between reads.
    behind = 1.5  # not the default 0.5 s: a loaded machine may take that long to send one
    monkeypatch.setattr(ReadPacing, "BEHIND_SECONDS", behind)
    asked: list[int] = []
    waiting_bytes = stream_module.waiting_bytes
    monkeypatch.setattr(stream_module, "waiting_bytes",
                        lambda fd: asked.append(fd) or waiting_bytes(fd))
    feed = make_feed(pg_dsn)
    start(feed)
    backlog = 1500
    tasks.execute(f"DO $$ BEGIN FOR n IN 0..{backlog - 1} LOOP"  # a transaction each
                  " INSERT INTO tasks (title) VALUES ('old ' || n); COMMIT; END LOOP; END $$")
    committed = time.time()
    while time.time() - committed < behind:  # old enough to be a backlog
        time.sleep(0.05)
    changes = feed.changes(timeout=60)
    for number in range(backlog):
        change = next(changes)
        assert change.new["title"] == f"old {number}"
        feed.ack(change.position)
    assert asked, "reading the backlog asked how much waits"
    for number in range(12):  # live: each read before the next is committed
        if number in (4, 8):
            time.sleep(behind + 0.5)  # the consumer idles, with a Commit read long ago
        tasks.execute("INSERT INTO tasks (title) VALUES (%s)", [f"live {number}"])
        change = next(changes)
        assert change.new["title"] == f"live {number}"
        feed.ack(change.position)
        if number == 0:  # the wait before it still judged by the backlog's last commit
            asked.clear()
    assert asked == []
    changes.close()
    feed.close()


def test_missing_table_is_a_clear_configuration_error(pg_dsn, pg):
    with pytest.raises(ConfigurationError, match="table 'nope' does not exist in database"):
        list(make_feed(pg_dsn, "nope").changes(timeout=2))


def test_slot_in_use_is_a_clear_error(pg_dsn, tasks):
    first = make_feed(pg_dsn)
    iterator = first.changes(ticks=True)
    next(iterator)  # streaming now, holding the slot
    try:
        at_once = time.monotonic()
        with pytest.raises(PermanentBackendError, match=r"slot changefeed_tasks is in use by"
                           r" another process \(pid \d+\): stop it, or use another --slot"):
            list(make_feed(pg_dsn, slot_wait=0).changes(timeout=20))
        assert time.monotonic() - at_once < 10
        # Waited for, the slot stays in use: the same error, saying how long it waited.
        began = time.monotonic()
        with pytest.raises(PermanentBackendError, match=r"slot changefeed_tasks is in use by"
                           r" another process \(pid \d+\) \(still after [\d.]+ s\)"):
            list(make_feed(pg_dsn, slot_wait=0.5).changes(timeout=20))
        assert time.monotonic() - began >= 0.5
    finally:
        iterator.close()


class Messages(logging.Handler):
    """The messages of one logger, from any thread (set on the logger itself: the CLI's
    logging set-up, run in-process by other tests, stops changefeed's from propagating)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())

    def __enter__(self) -> Messages:
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)

    def saw(self, text: str) -> bool:
        return any(text in message for message in self.texts)


def read_in_thread(feed, **options):
    """Read ``feed`` in a thread: (the thread, its changes, the error it ended with)."""
    got, errors = [], []

    def read():
        try:
            got.extend(feed.changes(**options))
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got, errors


@pytest.mark.parametrize("held_by", ["feed", "walsender"])
def test_a_first_connection_waits_for_a_slot_still_held_to_be_released(pg_dsn, tasks, held_by):
    """A supervisor restarting a feed that just died finds its slot still held (by a feed or
    by a bare replication connection, as a walsender whose client is gone holds it): the new
    feed waits for the slot to be released, then streams what the slot kept."""
    if held_by == "feed":
        first = make_feed(pg_dsn)
        holder = first.changes(ticks=True)
        next(holder)  # streaming now, holding the slot
        release = holder.close
    else:
        start(make_feed(pg_dsn))
        holder = psycopg.connect(pg_dsn, autocommit=True, replication="database")
        holder.execute("START_REPLICATION SLOT changefeed_tasks LOGICAL 0/0"
                       " (proto_version '1', publication_names 'changefeed_tasks')")
        release = holder.close
    tasks.execute("INSERT INTO tasks (title) VALUES ('kept by the slot')")
    with Messages("changefeed.postgres") as log:
        thread, got, errors = read_in_thread(make_feed(pg_dsn, slot_wait=60), limit=1,
                                             timeout=60)
        try:
            wait_until(lambda: log.saw("waiting up to 60 s for it to be released") or errors,
                       "the feed to wait for the slot")
            assert not errors, errors
            assert thread.is_alive()  # waiting, not failed
        finally:
            release()
        thread.join(60)
    assert not thread.is_alive()
    assert not errors, errors
    assert [(change.operation, change.new["title"]) for change in got] == [
        (Operation.INSERT, "kept by the slot")]
    assert log.saw("slot changefeed_tasks was released")


def test_a_stop_request_ends_the_wait_for_a_slot(pg_dsn, tasks):
    first = make_feed(pg_dsn)
    holder = first.changes(ticks=True)
    next(holder)
    try:
        waiting = make_feed(pg_dsn, slot_wait=300)
        with Messages("changefeed.postgres") as log:
            thread, got, errors = read_in_thread(waiting, timeout=600)
            wait_until(lambda: log.saw("waiting up to 300 s") or errors,
                       "the feed to wait for the slot")
            asked = time.monotonic()
            waiting.stop()
            thread.join(60)
        assert not thread.is_alive()
        assert time.monotonic() - asked < 30  # not the 300 s
        assert (got, errors) == ([], [])  # stopped as asked, not failed
    finally:
        holder.close()


@pytest.mark.parametrize("wait", [-1, float("nan"), float("inf"), "10", True])
def test_slot_wait_must_be_a_number_of_seconds(wait):
    with pytest.raises(ConfigurationError, match="slot_wait="):
        PostgresChangeFeed("tasks", connection="postgresql://localhost/db", slot_wait=wait)


def test_role_without_replication_privilege_is_a_clear_error(pg_dsn, tasks, pg_server):
    tasks.execute("CREATE ROLE plain_feed LOGIN")
    tasks.execute("GRANT SELECT ON tasks TO plain_feed")
    dsn = pg_dsn.replace("postgres@", "plain_feed@")
    with pytest.raises(PermanentBackendError, match="lacks the REPLICATION privilege"):
        list(make_feed(dsn, slot="changefeed_plain", publication="pub_plain").changes(timeout=5))


def test_a_snapshot_cut_short_continues_after_its_last_delivered_chunk(pg_dsn, pg):
    pg.execute("CREATE TABLE s (id int PRIMARY KEY)")
    pg.execute("INSERT INTO s SELECT generate_series(1, 50)")
    feed = make_feed(pg_dsn, "s", prefeed="snapshot", chunk_size=10)
    for change in feed.changes(limit=20):
        feed.ack(change.position)  # 20 of 50 delivered (two chunks), then the process dies
    feed.close()
    pg.execute("DELETE FROM s WHERE id IN (5, 25)")  # one row delivered, one not yet
    pg.execute("INSERT INTO s VALUES (51)")
    again = make_feed(pg_dsn, "s", prefeed="snapshot", chunk_size=10)
    got = drain(again)
    # The stream brings what happened meanwhile; the snapshot goes on from row 21.
    assert [(c.operation, c.key["id"]) for c in got if not c.snapshot] == [
        (Operation.DELETE, 5), (Operation.DELETE, 25), (Operation.INSERT, 51)]
    # (Row 51, which the stream gave a moment before its chunk was read, may come again.)
    snapshot = [c.key["id"] for c in got if c.snapshot]
    assert snapshot in ([n for n in range(21, 51) if n != 25],
                        [n for n in range(21, 52) if n != 25])
    pg.execute("INSERT INTO s VALUES (52)")
    # Once delivered, the snapshot is not taken again: the stream continues.
    assert [(c.key["id"], c.snapshot) for c in drain(make_feed(pg_dsn, "s", prefeed="snapshot"))] \
        == [(52, False)]


def test_an_exported_snapshot_cut_short_is_taken_again(pg_dsn, pg, monkeypatch):
    # Servers before PostgreSQL 14 (no watermarks through the slot) read the snapshot at the
    # slot's creation: cut short, it is taken again from a new slot.
    monkeypatch.setattr(feed_module, "in_chunks", lambda version, tables: False)
    pg.execute("CREATE TABLE s (id int NOT NULL)")
    pg.execute("INSERT INTO s SELECT generate_series(1, 50)")
    feed = make_feed(pg_dsn, "s", prefeed="snapshot", chunk_size=10,
                     operation=Operation.INSERT)
    for change in feed.changes(limit=20):
        feed.ack(change.position)
    feed.close()
    pg.execute("INSERT INTO s VALUES (51)")
    again = make_feed(pg_dsn, "s", prefeed="snapshot", operation=Operation.INSERT)
    assert [c.new["id"] for c in drain(again) if c.snapshot] == list(range(1, 52))


def test_a_snapshot_of_a_table_without_key_cut_short_continues_after_its_last_chunk(pg_dsn, pg):
    pg.execute("CREATE TABLE s (id int NOT NULL)")  # no key: read in chunks by ctid
    pg.execute("INSERT INTO s SELECT generate_series(1, 50)")
    feed = make_feed(pg_dsn, "s", prefeed="snapshot", chunk_size=10,
                     operation=Operation.INSERT)
    first = []
    for change in feed.changes(limit=20):
        first.append(change.new["id"])
        feed.ack(change.position)
    feed.close()
    pg.execute("INSERT INTO s VALUES (51)")
    again = [(c.new["id"], c.snapshot, c.key) for c in drain(
        make_feed(pg_dsn, "s", prefeed="snapshot", operation=Operation.INSERT))]
    assert first == list(range(1, 21))
    assert sorted(again) == [(n, n <= 50, {"id": n}) for n in range(21, 52)]


def test_one_slot_serves_several_tables(pg_dsn, pg):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE not_watched (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, "a, b")
    # Never the name a table called a_b would get: several tables' names carry a hash.
    assert feed.slot.startswith("changefeed_a_b_") and feed.slot != make_feed(pg_dsn, "a_b").slot
    start(feed)
    with pg.transaction():
        pg.execute("INSERT INTO a VALUES (1)")
        pg.execute("INSERT INTO not_watched VALUES (1)")
        pg.execute("INSERT INTO b VALUES (2)")
    assert [(c.table, c.key) for c in drain(feed)] == [("public.a", {"id": 1}),
                                                       ("public.b", {"id": 2})]


def test_survives_a_postgresql_restart_without_losing_a_commit(pg_dsn, pg_server):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE r (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, "r")
    start(feed)

    def write(first, last):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for number in range(first, last):
                conn.execute("INSERT INTO r VALUES (%s)", [number])

    def restart_then_write():
        pg_server.restart()  # mid-stream: the feed's connection dies with the server
        write(100, 200)

    write(0, 100)
    seen = []
    restarter = threading.Thread(target=restart_then_write)
    for change in feed.changes(timeout=60):
        seen.append(change.key["id"])
        feed.ack(change.position)
        if len(seen) == 50:
            restarter.start()
            # The feed is slow: most of the first rows are still unread when the server stops.
            # Not a wait on a condition, on purpose: blocking here until the restart is done
            # would hang the shutdown (a logical walsender waits for the client to confirm).
            time.sleep(0.5)
        if set(seen) == set(range(200)):
            break
    restarter.join()
    assert set(seen) == set(range(200))
    assert feed.stats.reconnects >= 1


def test_a_busy_consumer_that_keeps_the_feed_alive_does_not_hold_a_server_shutdown(
    pg_dsn, pg_server
):
    # A consumer stuck in a slow sink holds a transaction's changes unacknowledged. While it
    # calls keep_alive(), the feed answers the walsender, so `pg_ctl -m fast stop` is not kept
    # waiting for wal_sender_timeout (60 s here); the slot stays where it was acknowledged.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE busy (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, "busy")
    start(feed)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO busy SELECT generate_series(1, 30)")
        conn.execute("INSERT INTO busy VALUES (31)")
    changes = feed.changes(timeout=60)
    first = next(changes)  # the consumer got one change, and is now busy delivering it
    assert first.key == {"id": 1}
    stopped = threading.Event()
    took: list[float] = []

    def restart():
        try:
            took.append(fast_stop_then_start(pg_server))
        finally:
            stopped.set()

    restarter = threading.Thread(target=restart)
    restarter.start()
    deadline = time.monotonic() + 40
    while not stopped.is_set() and time.monotonic() < deadline:
        feed.keep_alive()
        stopped.wait(0.2)
    restarter.join()
    assert took and took[0] < 15, f"the server's shutdown waited {took} s for the feed"
    # Back from its sink, the consumer goes on: the feed reconnects and nothing is missing.
    seen = [first.key["id"]]
    for change in changes:
        seen.append(change.key["id"])
        feed.ack(change.position)
        if set(seen) == set(range(1, 32)):
            break
    changes.close()
    assert set(seen) == set(range(1, 32))


def test_keep_alive_answers_the_walsender_so_a_slow_consumer_is_not_cut_off(pg_dsn, pg):
    # With wal_sender_timeout at 4 s, a consumer busy for three timeouts keeps its stream
    # (no reconnect) because it calls keep_alive(), and then receives everything in order.
    # The walsender asks for an answer half a timeout after the last one and gives up at the
    # timeout: the consumer may be held up that long (at 1 s, a loaded machine's half second
    # without a turn cut the stream off).
    timeout = 4.0
    pg.execute("CREATE TABLE slow (id int PRIMARY KEY)")
    pg.execute(f"ALTER ROLE postgres IN DATABASE {pg.info.dbname}"
               f" SET wal_sender_timeout = '{timeout:g}s'")
    feed = make_feed(pg_dsn, "slow", status_interval=30)  # answers only when asked
    start(feed)
    pg.execute("INSERT INTO slow SELECT generate_series(1, 5)")
    changes = feed.changes(timeout=60)
    got = [next(changes).key["id"]]
    written = 0
    busy_until = time.monotonic() + 3 * timeout
    while time.monotonic() < busy_until:
        written += 1
        pg.execute("INSERT INTO slow VALUES (%s)", [100 + written])  # more stream meanwhile
        feed.keep_alive()
        time.sleep(0.2)  # busy: the consumer's own time
    expected = [1, 2, 3, 4, 5] + [100 + n for n in range(1, written + 1)]
    for change in changes:
        got.append(change.key["id"])
        feed.ack(change.position)
        if len(got) == len(expected):
            break
    changes.close()
    assert got == expected
    assert feed.stats.reconnects == 0
