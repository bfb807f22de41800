"""The PostgreSQL feed on real schemas: partitions, renames, drops, names, replica identity,
server limits. Each class of failure with several members, on a real server."""

from __future__ import annotations

import json

import psycopg
import pytest
from clitools import run_cli, start_cli
from feeds import FAST_RETRY, drain, make_feed, start
from psycopg import sql
from testservers import drop_slot

from changefeed import ALL, ConfigurationError, Operation, PermanentBackendError, ResumeError
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.backends.postgres.names import default_slot_name, parse_table_name
from changefeed.embedded import TemporaryPostgres

pytestmark = pytest.mark.postgres


def slots(pg) -> set[str]:
    return {row[0] for row in pg.execute("SELECT slot_name FROM pg_replication_slots")}


def publications(pg) -> set[str]:
    return {row[0] for row in pg.execute("SELECT pubname FROM pg_publication")}


# -- partitioned tables ------------------------------------------------------------------------


@pytest.mark.parametrize("partitioning", [
    "RANGE (id)",
    "LIST (region)",
    "HASH (id)",
])
def test_a_partitioned_table_streams_every_partition_under_its_own_name(pg_dsn, pg, partitioning):
    pg.execute(f"CREATE TABLE m (id int, region text, v int, PRIMARY KEY (id, region))"
               f" PARTITION BY {partitioning}")
    if partitioning.startswith("RANGE"):
        pg.execute("CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100)")
        pg.execute("CREATE TABLE m_2 PARTITION OF m FOR VALUES FROM (100) TO (200)")
        later = "CREATE TABLE m_3 PARTITION OF m FOR VALUES FROM (200) TO (300)"
    elif partitioning.startswith("LIST"):
        pg.execute("CREATE TABLE m_1 PARTITION OF m FOR VALUES IN ('a')")
        pg.execute("CREATE TABLE m_2 PARTITION OF m FOR VALUES IN ('b')")
        later = "CREATE TABLE m_3 PARTITION OF m DEFAULT"
    else:
        pg.execute("CREATE TABLE m_1 PARTITION OF m FOR VALUES WITH (MODULUS 2, REMAINDER 0)")
        pg.execute("CREATE TABLE m_2 (LIKE m INCLUDING ALL)")  # attached below
        later = "ALTER TABLE m ATTACH PARTITION m_2 FOR VALUES WITH (MODULUS 2, REMAINDER 1)"
    keep = ("WHERE satisfies_hash_partition('m'::regclass, 2, 0, g)"
            if partitioning.startswith("HASH") else "")  # only m_1 is attached so far
    pg.execute(f"INSERT INTO m SELECT g, 'a', 0 FROM generate_series(1, 40) g {keep}")
    before = pg.execute("SELECT count(*) FROM m").fetchone()[0]
    feed = make_feed(pg_dsn, "m", prefeed="snapshot")
    snapshot = drain(feed)
    assert len(snapshot) == before and {c.table for c in snapshot} == {"public.m"}
    pg.execute(later)
    if partitioning.startswith("RANGE"):
        rows = [(55, "x"), (150, "b"), (250, "c")]  # the last one lands in the new partition
    elif partitioning.startswith("LIST"):
        rows = [(1000, "a"), (1001, "b"), (1002, "zz")]  # "zz" goes to the new default
    else:
        rows = [(1000 + n, "x") for n in range(6)]  # both hash partitions
    for key, where in rows:
        pg.execute("INSERT INTO m VALUES (%s, %s, 1)", [key, where])
    pg.execute("UPDATE m SET v = 2 WHERE id = %s", [rows[-1][0]])
    pg.execute("DELETE FROM m WHERE id = %s", [rows[0][0]])
    got = drain(feed)
    assert [(c.operation, c.table, c.key["id"]) for c in got] == [
        *[(Operation.INSERT, "public.m", key) for key, _ in rows],
        (Operation.UPDATE, "public.m", rows[-1][0]),
        (Operation.DELETE, "public.m", rows[0][0]),
    ]
    # A later run reuses the publication (no "already member of publication"), and reads
    # the partition that appeared since the last run once (its rows may come again).
    pg.execute("INSERT INTO m VALUES (99, 'b', 3)")
    later = drain(make_feed(pg_dsn, "m"))
    assert [c.key for c in later if not c.snapshot] == [{"id": 99, "region": "b"}]
    new_partition = "m_2" if partitioning.startswith("HASH") else "m_3"
    assert {c.key["id"] for c in later if c.snapshot} == {
        key for (key,) in pg.execute(f"SELECT id FROM {new_partition}").fetchall()}


def test_a_partition_of_a_watched_table_is_not_a_separate_feed_of_changes(pg_dsn, pg):
    pg.execute("CREATE TABLE p (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    pg.execute("CREATE TABLE p_low PARTITION OF p FOR VALUES FROM (0) TO (10)")
    feed = make_feed(pg_dsn, "p", operation=Operation.INSERT)
    start(feed)
    pg.execute("INSERT INTO p_low VALUES (1)")  # written to the partition directly
    assert [(c.table, c.key) for c in drain(feed)] == [("public.p", {"id": 1})]


# -- renamed and dropped tables ----------------------------------------------------------------


@pytest.mark.parametrize("rename", [
    "ALTER TABLE tasks RENAME TO jobs",
    "ALTER TABLE tasks SET SCHEMA archive",
])
def test_a_renamed_table_keeps_streaming_under_its_new_name(pg_dsn, pg, caplog, rename):
    pg.execute("CREATE SCHEMA archive")
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    feed = make_feed(pg_dsn, "tasks")
    start(feed)
    pg.execute("INSERT INTO tasks VALUES (1, 'before')")
    pg.execute(rename)
    new_name = "public.jobs" if "RENAME" in rename else "archive.tasks"
    table = new_name.split(".")[1] if "RENAME" in rename else new_name
    pg.execute(f"INSERT INTO {table} VALUES (2, 'after')")
    pg.execute(f"UPDATE {table} SET title = 'changed' WHERE id = 1")
    got = drain(feed)
    assert [(c.table, c.key["id"], c.operation) for c in got] == [
        ("public.tasks", 1, Operation.INSERT),
        (new_name, 2, Operation.INSERT),
        (new_name, 1, Operation.UPDATE),
    ]
    warnings = [r.getMessage() for r in caplog.records if "now" in r.getMessage()]
    assert warnings == [
        f"table public.tasks is now {new_name}: its changes go on under the new name"
    ]
    feed.close()
    # A restart under the new name continues the same slot: nothing written meanwhile is lost.
    pg.execute(f"INSERT INTO {table} VALUES (3, 'while away')")
    again = make_feed(pg_dsn, new_name)
    assert again.slot != feed.slot
    assert [c.key["id"] for c in drain(again)] == [3]
    assert again.slot == feed.slot  # it found the old slot by the table's OID
    assert len([s for s in slots(pg) if s.startswith("changefeed_")]) == 1


def test_a_rename_during_a_reconnect_loses_nothing(pg_dsn, pg):
    pg.execute("CREATE TABLE t1 (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, "t1")
    start(feed)
    pg.execute("INSERT INTO t1 VALUES (1)")
    assert [c.key["id"] for c in drain(feed)] == [1]
    pg.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active")
    pg.execute("ALTER TABLE t1 RENAME TO t2")
    pg.execute("INSERT INTO t2 VALUES (2)")
    got = drain(feed)
    assert [(c.table, c.key["id"]) for c in got] == [("public.t2", 2)]


@pytest.mark.parametrize("drop", ["DROP TABLE gone", "DROP TABLE gone CASCADE"])
def test_dropping_the_table_ends_the_feed_after_its_last_change(pg_dsn, pg, drop):
    pg.execute("CREATE TABLE gone (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, "gone")
    start(feed)
    with pg.transaction():
        pg.execute("INSERT INTO gone SELECT generate_series(1, 25)")
    pg.execute(drop)
    got = []
    with pytest.raises(PermanentBackendError, match="table public.gone was dropped"):
        for change in feed.changes(timeout=60):
            got.append(change.key["id"])
            feed.ack(change.position)
    assert got == list(range(1, 26))


def test_dropping_one_of_several_tables_ends_the_cli_with_exit_code_3(pg_dsn, pg):
    pg.execute("CREATE TABLE keep (id int PRIMARY KEY); CREATE TABLE lose (id int PRIMARY KEY)")
    with start_cli("run", "keep,lose", "--url", pg_dsn, "--format", "change") as process:
        process.wait_streaming()
        pg.execute("INSERT INTO lose VALUES (1); INSERT INTO keep VALUES (2)")
        pg.execute("DROP TABLE lose")
        returncode, stdout = process.finish(timeout=60)
    assert returncode == 3, process.stderr
    assert "Traceback" not in process.stderr
    assert "table public.lose was dropped" in process.stderr
    assert [line.count('"insert"') for line in stdout.splitlines()] == [1, 1]


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("first, second", [
    ("app.tasks", "app_tasks"),
    ('"CamelCase"', "camelcase"),
    ('"a.b"', "a.b"),
    ("x" * 60, "x" * 60 + "yz"),
    ('"Tasks"', '"TASKS"'),
])
def test_tables_whose_names_look_alike_get_their_own_slots(pg_dsn, pg, first, second):
    pg.execute("CREATE SCHEMA IF NOT EXISTS app; CREATE SCHEMA IF NOT EXISTS a")
    for name in (first, second):
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    one, two = make_feed(pg_dsn, first), make_feed(pg_dsn, second)
    assert one.slot != two.slot
    start(one)
    start(two)
    pg.execute(f"INSERT INTO {first} VALUES (1)")
    pg.execute(f"INSERT INTO {second} VALUES (2)")
    assert [c.key["id"] for c in drain(one)] == [1]
    assert [c.key["id"] for c in drain(two)] == [2]


def test_default_names_stay_as_before_for_plain_names():
    assert default_slot_name([parse_table_name("tasks")]) == "changefeed_tasks"
    assert default_slot_name([parse_table_name("public.tasks")]) == "changefeed_tasks"
    assert default_slot_name([parse_table_name('"tasks"')]) == "changefeed_tasks"
    assert len(default_slot_name([parse_table_name("x" * 63)])) <= 63


@pytest.mark.parametrize(
    "name", ['"My Schema"."With Space"', '"Mixed"."CaseTable"', '"dots.in.name"']
)
def test_quoted_identifiers_work(pg_dsn, pg, name):
    schema = name.split(".")[0] if name.count('"') == 4 else None
    if schema:
        pg.execute(f"CREATE SCHEMA {schema}")
    pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, name)
    start(feed)
    pg.execute(f"INSERT INTO {name} VALUES (1)")
    (change,) = drain(feed)
    assert change.key == {"id": 1} and change.table.endswith(name.split('"')[-2])


def test_an_unquoted_name_that_only_exists_quoted_gets_a_hint(pg_dsn, pg):
    pg.execute('CREATE TABLE "OnlyCamel" (id int PRIMARY KEY)')
    with pytest.raises(ConfigurationError, match=r'did you mean public\."OnlyCamel"'):
        list(make_feed(pg_dsn, "OnlyCamel").changes(timeout=5))
    assert publications(pg) == set() and slots(pg) == set()


@pytest.mark.parametrize("options", [
    {"slot": "Bad-Name"}, {"slot": "x" * 64}, {"slot": ""}, {"slot": "has space"},
    {"publication": "p" * 64},
])
def test_invalid_slot_and_publication_names_are_refused_before_anything_is_made(
    pg_dsn, pg, options
):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY)")
    with pytest.raises(ConfigurationError, match="invalid"):
        PostgresChangeFeed("tasks", connection=pg_dsn, **options)
    option, value = next(iter(options.items()))
    result = run_cli("run", "tasks", "--url", pg_dsn, f"--{option}", value, timeout=30)
    assert result.returncode == 2 and "invalid" in result.stderr
    assert "Traceback" not in result.stderr
    assert publications(pg) == set() and slots(pg) == set()


def test_a_publication_serving_other_tables_is_refused(pg_dsn, pg):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    start(make_feed(pg_dsn, "a", slot="shared_slot", publication="shared_pub"))
    with pytest.raises(ConfigurationError, match="publication shared_pub serves a, not public.b"):
        list(make_feed(pg_dsn, "b", slot="other_slot", publication="shared_pub").changes(timeout=5))
    with pytest.raises(ConfigurationError, match="serves publication shared_pub"):
        list(make_feed(pg_dsn, "b", slot="shared_slot", publication="b_pub").changes(timeout=5))
    # Another slot may share the publication for the same tables and operations, not change
    # the operations under the first feed.
    start(make_feed(pg_dsn, "a", slot="second_slot", publication="shared_pub"))
    with pytest.raises(ConfigurationError, match="shared with slot shared_slot"):
        list(make_feed(pg_dsn, "a", slot="third_slot", publication="shared_pub",
                       operation=Operation.INSERT).changes(timeout=5))
    assert pg.execute("SELECT pubupdate FROM pg_publication WHERE pubname = 'shared_pub'"
                      ).fetchone() == (True,)
    pg.execute("CREATE PUBLICATION everything FOR ALL TABLES")
    with pytest.raises(ConfigurationError, match="FOR ALL TABLES"):
        list(make_feed(pg_dsn, "a", slot="s3", publication="everything").changes(timeout=5))
    assert "other_slot" not in slots(pg) and "b_pub" not in publications(pg)


def record(pg, publication: str) -> str:
    """changefeed's record on ``publication`` (its comment), as written."""
    return pg.execute("SELECT obj_description(oid, 'pg_publication') FROM pg_publication"
                      " WHERE pubname = %s", [publication]).fetchone()[0]


@pytest.mark.parametrize("key", ["int", "text", "uuid"])
def test_a_snapshot_for_a_slot_sharing_another_slots_publication_is_refused(pg_dsn, pg, key):
    """The publication's record holds the snapshot and back-fill states of the slot that made
    it: another slot asking for a snapshot through it would find them done and get nothing."""
    values = {"int": "g", "text": "'k' || g", "uuid": "md5(g::text)::uuid"}[key]
    pg.execute(f"CREATE TABLE tasks (id {key} PRIMARY KEY, v int)")
    pg.execute(f"INSERT INTO tasks SELECT {values}, g FROM generate_series(1, 30) g")
    first = make_feed(pg_dsn, slot="first", publication="shared", prefeed="snapshot")
    assert len(drain(first, close=True)) == 30
    before = record(pg, "shared")
    with pytest.raises(ConfigurationError, match="publication shared records the snapshot of"
                       " slot first: a snapshot for slot second needs a publication of its own"):
        list(make_feed(pg_dsn, slot="second", publication="shared",
                       prefeed="snapshot").changes(timeout=5))
    result = run_cli("run", "tasks", "--url", pg_dsn, "--slot", "third", "--publication",
                     "shared", "--prefeed", "snapshot", "--until-idle", "0.5", timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    assert "needs a publication of its own" in result.stderr
    assert "Traceback" not in result.stderr
    assert slots(pg) == {"first"} and record(pg, "shared") == before
    # Its own publication gives it the snapshot.
    second = make_feed(pg_dsn, slot="second", publication="second", prefeed="snapshot")
    assert sorted(c.new["v"] for c in drain(second, close=True)) == list(range(1, 31))


def test_a_slot_takes_over_the_publication_of_a_dropped_slot_and_gets_its_snapshot(pg_dsn, pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO tasks SELECT g, 'v' || g FROM generate_series(1, 25) g")
    assert len(drain(make_feed(pg_dsn, slot="gone", publication="kept", prefeed="snapshot"),
                     close=True)) == 25
    drop_slot(pg, "gone")
    pg.execute("INSERT INTO tasks VALUES (26, 'v26')")
    feed = make_feed(pg_dsn, slot="new", publication="kept", prefeed="snapshot")
    got = drain(feed)
    assert sorted(c.new["id"] for c in got) == list(range(1, 27))
    assert '"slot": "new"' in record(pg, "kept")
    pg.execute("INSERT INTO tasks VALUES (27, 'v27')")
    assert [c.new["id"] for c in drain(feed, close=True)] == [27]
    # Its snapshot is recorded as its own: a restart does not take it again.
    assert drain(make_feed(pg_dsn, slot="new", publication="kept", prefeed="snapshot"),
                 close=True) == []


def test_a_feed_sharing_a_publication_leaves_the_owners_back_fill_alone(pg_dsn, pg):
    """A feed of another slot on the same publication neither continues nor records the
    owner's back-fill (cut short here: its record says where the owner's next chunk starts)."""
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO tasks SELECT g, 'v' || g FROM generate_series(1, 40) g")
    start(make_feed(pg_dsn, slot="owner", publication="shared"))
    prefix, meta = record(pg, "shared").split(" ", 1)
    oid = pg.execute("SELECT 'tasks'::regclass::oid::int").fetchone()[0]
    states = json.loads(meta)
    assert states["slot"] == "owner"
    states["backfill"] = {str(oid): {"after": ["10"], "done": 10, "chunks": 1}}
    cut_short = f"{prefix} {json.dumps(states)}"
    pg.execute(sql.SQL("COMMENT ON PUBLICATION shared IS {}").format(cut_short))
    sharer = make_feed(pg_dsn, slot="sharer", publication="shared")
    start(sharer)
    pg.execute("INSERT INTO tasks VALUES (41, 'v41')")
    assert [c.new["id"] for c in drain(sharer, close=True)] == [41]
    assert record(pg, "shared") == cut_short
    # The owner goes on from its own record: the rows after its last chunk, then the insert.
    got = drain(make_feed(pg_dsn, slot="owner", publication="shared"), close=True)
    assert sorted(c.new["id"] for c in got) == list(range(11, 42))


# -- replica identity --------------------------------------------------------------------------


@pytest.mark.parametrize("table, ops", [
    ("CREATE TABLE nokey (id int, v int)", ALL),
    ("CREATE TABLE nokey (id int, v int)", Operation.UPDATE),
    ("CREATE TABLE nokey (id int, v int)", Operation.DELETE),
    ("CREATE TABLE nokey (id int PRIMARY KEY, v int); ALTER TABLE nokey REPLICA IDENTITY NOTHING",
     ALL),
    ("CREATE TABLE nokey (id int NOT NULL, v int); CREATE UNIQUE INDEX nk ON nokey (id);"
     " ALTER TABLE nokey REPLICA IDENTITY USING INDEX nk; DROP INDEX nk", ALL),
    ("CREATE TABLE nokey (id int, v int) PARTITION BY RANGE (id);"
     " CREATE TABLE nokey_1 PARTITION OF nokey FOR VALUES FROM (0) TO (10)", ALL),
])
def test_a_table_without_replica_identity_is_refused_and_the_application_keeps_working(
    pg_dsn, pg, table, ops
):
    pg.execute(table)
    with pytest.raises(ConfigurationError, match="has no replica identity.*--ops insert"):
        list(make_feed(pg_dsn, "nokey", operation=ops).changes(timeout=5))
    pg.execute("INSERT INTO nokey VALUES (1, 1)")
    pg.execute("UPDATE nokey SET v = 2")  # the application's own writes still work
    pg.execute("DELETE FROM nokey")
    assert publications(pg) == set() and slots(pg) == set()
    result = run_cli("run", "nokey", "--url", pg_dsn, timeout=30)
    assert result.returncode == 2 and "REPLICA IDENTITY FULL" in result.stderr


@pytest.mark.parametrize("setup", [
    "CREATE TABLE nokey (id int, v int)",
    "CREATE TABLE nokey (id int, v int); ALTER TABLE nokey REPLICA IDENTITY NOTHING",
])
def test_inserts_only_work_on_a_table_without_replica_identity(pg_dsn, pg, setup):
    pg.execute(setup)
    feed = make_feed(pg_dsn, "nokey", operation=Operation.INSERT)
    start(feed)
    pg.execute("INSERT INTO nokey VALUES (1, 1)")
    pg.execute("UPDATE nokey SET v = 2")
    pg.execute("DELETE FROM nokey")
    assert [c.new for c in drain(feed)] == [{"id": 1, "v": 1}]
    # Widening the same feed to updates later is refused, not applied.
    with pytest.raises(ConfigurationError, match="no replica identity"):
        list(make_feed(pg_dsn, "nokey", operation=ALL).changes(timeout=5))
    pg.execute("UPDATE nokey SET v = 3")


def test_replica_identity_full_or_an_index_is_enough(pg_dsn, pg):
    pg.execute("CREATE TABLE f (id int, v int); ALTER TABLE f REPLICA IDENTITY FULL")
    pg.execute("CREATE TABLE i (id int NOT NULL, v int); CREATE UNIQUE INDEX i_id ON i (id);"
               " ALTER TABLE i REPLICA IDENTITY USING INDEX i_id")
    feed = make_feed(pg_dsn, "f, i")
    start(feed)
    pg.execute("INSERT INTO f VALUES (1, 1); UPDATE f SET v = 2; INSERT INTO i VALUES (5, 1);"
               " DELETE FROM i")
    assert [c.operation for c in drain(feed)] == [
        Operation.INSERT, Operation.UPDATE, Operation.INSERT, Operation.DELETE]


# -- server limits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server():
    with TemporaryPostgres({"max_replication_slots": "2", "max_wal_senders": "2"}) as server:
        yield server


def test_no_free_replication_slot_is_a_clear_error_that_leaves_nothing_behind(small_server):
    dsn = small_server.dsn()
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute("CREATE TABLE IF NOT EXISTS full_t (id int PRIMARY KEY)")
        for name in ("hog_1", "hog_2"):
            pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [name])
        try:
            feed = PostgresChangeFeed("full_t", connection=dsn, retry=FAST_RETRY)
            with pytest.raises(PermanentBackendError, match="raise max_replication_slots"):
                list(feed.changes(timeout=10))
            assert feed.stats.reconnects == 0
            assert "changefeed_full_t" not in publications(pg)
            result = run_cli("run", "full_t", "--url", dsn, timeout=60)
            assert result.returncode == 3 and "max_replication_slots" in result.stderr
        finally:
            for name in ("hog_1", "hog_2"):
                pg.execute("SELECT pg_drop_replication_slot(%s)", [name])


def test_no_free_wal_sender_is_a_clear_error(small_server):
    dsn = small_server.dsn()
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute("CREATE TABLE IF NOT EXISTS busy_t (id int PRIMARY KEY)")
    hogs = [psycopg.connect(dsn, replication="database", autocommit=True) for _ in range(2)]
    try:
        feed = PostgresChangeFeed("busy_t", connection=dsn, retry=FAST_RETRY)
        with pytest.raises(PermanentBackendError, match="raise max_wal_senders"):
            list(feed.changes(timeout=10))
        result = run_cli("run", "busy_t", "--url", dsn, timeout=60)
        assert result.returncode == 3 and "max_wal_senders" in result.stderr
    finally:
        for hog in hogs:
            hog.close()


def test_a_slot_dropped_while_the_feed_runs_is_a_resume_error(pg_dsn, pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY)")
    feed = make_feed(pg_dsn, "tasks")
    start(feed)
    drop_slot(pg, "changefeed_tasks")  # once the walsender of start() has ended
    with pytest.raises(ResumeError, match="was dropped while the feed ran"):
        list(feed.changes(timeout=10))


# -- changefeed slots --------------------------------------------------------------------------


def test_slots_lists_named_slots_with_the_wal_they_retain_and_warns(pg_dsn, pg):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    start(make_feed(pg_dsn, "a"))
    start(make_feed(pg_dsn, "b", slot="my_own_slot", publication="my_pub"))
    pg.execute("SELECT pg_create_logical_replication_slot('not_ours', 'pgoutput')")
    pg.execute("INSERT INTO b SELECT generate_series(1, 2000)")  # WAL the slots must keep
    listing = run_cli("slots", "--url", pg_dsn, "--warn-retained", "1kB")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert set(lines) == {"changefeed_a", "my_own_slot"}  # not the slot changefeed did not make
    assert lines["my_own_slot"].endswith("public.b (named)")
    assert "kB" in lines["my_own_slot"] or "MB" in lines["my_own_slot"]
    warned = [line for line in listing.stderr.splitlines() if "keep" in line]
    assert len(warned) == 2 and all("changefeed slots --drop" in line for line in warned)
    quiet = run_cli("slots", "--url", pg_dsn, "--warn-retained", "10GB")
    assert "warning" not in quiet.stderr
    dropped = run_cli("slots", "--url", pg_dsn, "--drop", "my_own_slot")
    assert dropped.returncode == 0 and "my_pub" not in publications(pg)
    assert "my_own_slot" not in slots(pg) and "not_ours" in slots(pg)
    bad = run_cli("slots", "--url", pg_dsn, "--warn-retained", "lots")
    assert bad.returncode == 2 and "not a size" in bad.stderr
