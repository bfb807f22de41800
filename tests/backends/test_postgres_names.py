"""Names a hostile (or unlucky) operator gives reach every place they go intact, or are refused
in one line before anything is created: publications, slots, tables and schemas, message
prefixes. And a feed whose login the server refuses for good on a reconnect ends in one line
instead of reconnecting forever."""

from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest
from clitools import assert_exit, run_cli, start_cli
from psycopg import sql

pytestmark = pytest.mark.postgres

HOSTILE_PUBLICATIONS = ['p"; drop table tasks; --', "Upper,Comma", "back\\slash 'quote'",
                        " spaces ", "ünïcödé", "1leading", 'a""b,"c"', "é" * 31]


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    return pg


def stream_one(dsn: str, *args: str) -> list[dict]:
    """Run ``changefeed run ARGS``, insert a row once it streams, return what it printed."""
    with start_cli("run", "--url", dsn, "--format", "change", *args) as run:
        run.wait_streaming()
        with psycopg.connect(dsn, autocommit=True) as conn:
            table = args[0]
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(sql.SQL(table)),
                         [int(time.time() * 1000) % 1_000_000])
        rows = run.read_json(1, timeout=30)
        code, _ = run.stop(signal.SIGTERM)
        assert code == 0, run.stderr
    return rows


@pytest.mark.parametrize("name", HOSTILE_PUBLICATIONS)
def test_any_publication_name_works_and_injects_nothing(pg_dsn, tasks, name):
    rows = stream_one(pg_dsn, "tasks", "--publication", name, "--slot", "hostile")
    assert rows[0]["table"] == "public.tasks"
    names = [row[0] for row in tasks.execute("SELECT pubname FROM pg_publication")]
    assert names == [name]
    assert tasks.execute("SELECT to_regclass('tasks')").fetchone() == ("tasks",)


@pytest.mark.parametrize("option, value, problem", [
    ("--publication", "é" * 32, "use 1 to 63 bytes (it has 64)"),
    ("--publication", "new\nline", "control character"),
    ("--publication", "tab\there", "control character"),
    ("--publication", "", "use 1 to 63 bytes"),
    ("--slot", 'x"; drop table tasks; --', "invalid slot name"),
    ("--slot", "Upper", "invalid slot name"),
    ("--slot", "a" * 64, "invalid slot name"),
    ("--slot", "", "invalid slot name"),
])
def test_names_that_cannot_work_are_refused_before_anything_is_created(
        pg_dsn, tasks, option, value, problem):
    result = run_cli("run", "tasks", "--url", pg_dsn, option, value, "--until-idle", "1")
    assert_exit(result, 2, problem)
    assert tasks.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
    assert tasks.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


@pytest.mark.parametrize("schema, table", [
    ('Sch "q", x', "T'a\\b,le"),
    ("public", "1Ünï"),
    ("UPPER", "Mixed Case"),
    ("public", "p); drop table tasks; --"),
])
def test_any_table_and_schema_name_streams(pg_dsn, tasks, schema, table):
    tasks.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    identifier = sql.Identifier(schema, table).as_string(tasks)
    tasks.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(
        sql.Identifier(schema, table)))
    rows = stream_one(pg_dsn, identifier)
    assert rows[0]["table"] == f"{schema}.{table}"
    assert tasks.execute("SELECT to_regclass('tasks')").fetchone() == ("tasks",)


def test_hostile_message_prefixes_match_as_they_are(pg_dsn, tasks):
    prefixes = ["a'b", 'c"d', "e,f", "g\\h"]
    args = ["run", "tasks", "--url", pg_dsn]
    for prefix in prefixes:
        args += ["--messages", prefix]
    with start_cli(*args) as run:
        run.wait_streaming()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for prefix in prefixes:
                conn.execute("SELECT pg_logical_emit_message(true, %s, 'x')", [prefix + "!"])
        got = [json.loads(json.dumps(line))["prefix"] for line in run.read_json(4, timeout=30)]
        run.stop()
    assert got == [prefix + "!" for prefix in prefixes]


@pytest.mark.parametrize("refusal, fragment", [
    ("ALTER ROLE {role} NOLOGIN", "is not permitted to log in"),
    ("REVOKE CONNECT ON DATABASE {db} FROM PUBLIC", "permission denied for database"),
    ("ALTER DATABASE {db} ALLOW_CONNECTIONS false", "is not currently accepting connections"),
], ids=["nologin", "connect-revoked", "closed-database"])
def test_a_login_refused_for_good_on_a_reconnect_ends_the_feed_in_one_line(
        pg_dsn, tasks, pg_server, refusal, fragment):
    db = pg_dsn.rsplit("/", 1)[1]
    role = f"feeder_{db}"  # roles belong to the whole server: one per test
    tasks.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    tasks.execute(f"GRANT CREATE ON DATABASE {db} TO {role}")
    tasks.execute(f"ALTER TABLE tasks OWNER TO {role}")
    dsn = pg_dsn.replace("postgres@", f"{role}@")
    try:
        with start_cli("run", "tasks", "--url", dsn) as run:
            run.wait_streaming()
            with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
                admin.execute(refusal.format(db=db, role=role))
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE usename = %s", [role])
            code, _ = run.finish(timeout=60)  # not reconnecting forever
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute(f"ALTER ROLE {role} LOGIN")
            admin.execute(f"GRANT CONNECT ON DATABASE {db} TO PUBLIC")
            admin.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS true")
    assert code == 3, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and fragment in errors[0], run.stderr
    assert "Traceback" not in run.stderr
