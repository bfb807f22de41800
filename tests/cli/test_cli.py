"""The command line, run as a real process against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
from clitools import (
    assert_exit,
    assert_one_clear_line,
    json_lines,
    json_lines_before_kill,
    run_cli,
    start_cli,
)
from testservers import refused_port

from changefeed.embedded import TemporaryPostgres

pytestmark = pytest.mark.postgres

@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id serial PRIMARY KEY, title text, done boolean DEFAULT false)")
    return pg


def test_streams_snorky_deltas_as_json_lines(pg_dsn, tasks):
    tasks.execute("INSERT INTO tasks (title) VALUES ('old')")
    with start_cli("run", "tasks", "--url", pg_dsn, "--prefeed", "snapshot",
                   "--ops", "insert,update", "--model", "Task") as process:
        (first,) = process.read_json(1)
        tasks.execute("INSERT INTO tasks (title) VALUES ('new')")
        tasks.execute("UPDATE tasks SET done = true WHERE title = 'new'")
        tasks.execute("DELETE FROM tasks")  # not selected
        tasks.execute("INSERT INTO tasks (title) VALUES ('last')")
        lines = process.read_json(3)
        returncode, rest = process.stop(signal.SIGTERM)
    assert returncode == 0, process.stderr
    assert rest == ""
    assert first == {"type": "insert", "model": "Task",
                     "data": {"id": 1, "title": "old", "done": False}}
    assert lines[0] == {"type": "insert", "model": "Task",
                        "data": {"id": 2, "title": "new", "done": False}}
    assert lines[1] == {"type": "update", "model": "Task",
                        "newData": {"id": 2, "title": "new", "done": True}, "oldData": {"id": 2}}
    assert lines[2] == {"type": "insert", "model": "Task",
                        "data": {"id": 3, "title": "last", "done": False}}
    assert "streaming public.tasks from slot changefeed_tasks" in process.stderr
    assert "snapshot of public.tasks" in process.stderr


def test_change_format_and_url_from_the_environment(pg_dsn, tasks):
    assert run_cli("run", "tasks", "--limit", "1", "--idle-timeout", "0.5",
                   env={"CHANGEFEED_URL": pg_dsn}).returncode == 0
    tasks.execute("INSERT INTO tasks (title) VALUES ('x')")
    result = run_cli("run", "tasks", "--format", "change", "--limit", "1", "-q",
                     env={"CHANGEFEED_URL": pg_dsn})
    assert result.returncode == 0 and result.stderr == ""
    change = json.loads(result.stdout)
    assert change["operation"] == "insert" and change["table"] == "public.tasks"
    assert change["new"]["title"] == "x" and change["key"] == {"id": 1}
    assert re.fullmatch(r"[0-9A-F]{16}:00000000", change["position"]), change["position"]
    assert change["committed_at"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_acknowledges_what_was_written(pg_dsn, tasks, signum):
    with start_cli("run", "tasks", "--url", pg_dsn) as process:
        process.wait_streaming()
        tasks.execute("INSERT INTO tasks (title) VALUES ('a'), ('b')")
        assert [d["data"]["title"] for d in process.read_json(2)] == ["a", "b"]
        returncode, rest = process.stop(signum)
    assert returncode == 0 and rest == "", process.stderr
    tasks.execute("INSERT INTO tasks (title) VALUES ('c')")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--idle-timeout", "0.5", "-q")
    assert [d["data"]["title"] for d in json_lines(result.stdout)] == ["c"]


def test_sigkill_mid_stream_loses_nothing_and_repeats_only_unacknowledged(
    pg_dsn, tasks, tmp_path
):
    checkpoint = tmp_path / "checkpoint.json"
    args = ["run", "tasks", "--url", pg_dsn, "--format", "change", "--checkpoint",
            str(checkpoint)]
    assert run_cli(*args, "--idle-timeout", "0.5").returncode == 0  # creates the slot
    committed = []
    writer_done = threading.Event()

    def writer():
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for batch in range(100):
                with conn.transaction():
                    for row in range(10):
                        title = f"{batch}-{row}"
                        conn.execute("INSERT INTO tasks (title) VALUES (%s)", [title])
                committed.extend(f"{batch}-{row}" for row in range(10))
        writer_done.set()

    thread = threading.Thread(target=writer)
    with start_cli(*args) as process:
        process.wait_streaming()
        thread.start()
        first_run = process.read_json(300, timeout=120)
        # SIGKILL: no chance to flush or acknowledge anything more.
        _, rest = process.stop(signal.SIGKILL)
    first_run += json_lines_before_kill(rest)
    saved = json.loads(checkpoint.read_text())["tasks"] if checkpoint.exists() else None
    thread.join(timeout=120)
    assert writer_done.is_set() and len(committed) == 1000

    second_run = run_cli(*args, "--idle-timeout", "0.5", timeout=120)
    assert second_run.returncode == 0, second_run.stderr
    second = json_lines(second_run.stdout)
    first_titles = [c["new"]["title"] for c in first_run]
    assert first_titles == committed[:len(first_titles)]  # commit order, nothing skipped
    # The second run starts right after the last acknowledged change, not one change later
    # or earlier: whatever comes twice is exactly what was not acknowledged before the kill.
    acknowledged = [c for c in first_run if saved is not None and c["position"] <= saved]
    assert acknowledged == first_run[:len(acknowledged)]
    assert [c["new"]["title"] for c in second] == committed[len(acknowledged):]
    positions = [c["position"] for c in second]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


@pytest.mark.parametrize(
    "options", [[], ["--where", "id > 0"], ["--where", "id > 0", "--processes"]],
    ids=["lines", "pipeline", "processes"],
)
def test_a_reader_that_goes_away_ends_the_run_quietly_and_loses_nothing(pg_dsn, tasks, options):
    # `changefeed run ... | head -n 1`: what the reader never took is not acknowledged, with
    # the zero-stage output as with a pipeline's.
    with start_cli("run", "tasks", "--url", pg_dsn, *options) as process:
        process.wait_streaming()
        tasks.execute("INSERT INTO tasks (title) VALUES ('read')")
        assert process.read_json(1)[0]["data"]["title"] == "read"
        process.close_stdout()  # the reader goes away
        tasks.execute("INSERT INTO tasks (title) VALUES ('lost?')")
        tasks.execute("INSERT INTO tasks (title) SELECT 'more ' || g FROM generate_series(1, 3) g")
        returncode, _ = process.finish()
    assert returncode == 0, process.stderr
    assert "Traceback" not in process.stderr and "Broken pipe" not in process.stderr
    result = run_cli("run", "tasks", "--url", pg_dsn, "--idle-timeout", "0.5", "-q")
    titles = [d["data"]["title"] for d in json_lines(result.stdout)]
    assert titles == ["lost?", "more 1", "more 2", "more 3"]


def test_slots_lists_and_drops(pg_dsn, tasks):
    assert run_cli("run", "tasks", "--url", pg_dsn, "--idle-timeout", "0.3").returncode == 0
    listing = run_cli("slots", "--url", pg_dsn)
    assert listing.returncode == 0
    assert "changefeed_tasks" in listing.stdout and "public.tasks" in listing.stdout
    dropped = run_cli("slots", "--url", pg_dsn, "--drop", "changefeed_tasks")
    assert dropped.stdout.strip() == "dropped changefeed_tasks"
    assert tasks.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
    assert tasks.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
    assert_one_clear_line(run_cli("slots", "--url", pg_dsn, "--drop", "nope"), "no changefeed slot")


# -- bad input: one clear line, a non-zero exit, no traceback --------------------------------


def test_malformed_ops(pg_dsn):
    result = run_cli("run", "tasks", "--url", pg_dsn, "--ops", "insert,upsert")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown operation 'upsert'" in result.stderr
    assert "insert, delete, update" in result.stderr


def test_unknown_table(pg_dsn):
    assert_one_clear_line(run_cli("run", "nope", "--url", pg_dsn),
                          "table 'nope' does not exist in database")


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("postgresql://127.0.0.1:notaport/x", "bad PostgreSQL URL"),
        ("mysql://localhost/db", "unsupported URL (mysql://)"),
        ("localhost", "unsupported URL (no scheme)"),
    ],
)
def test_bad_url(url, fragment):
    assert_one_clear_line(run_cli("run", "tasks", "--url", url), fragment)


@pytest.mark.parametrize("url", ["mongodb://127.0.0.1:1/app", "rethinkdb://127.0.0.1:1/app"])
def test_postgresql_options_with_another_backend(url):
    result = run_cli("run", "tasks", "--url", url, "--slot", "mine")
    assert_one_clear_line(result, "--slot and --publication apply to PostgreSQL URLs only")
    assert result.returncode == 2


def test_slots_needs_a_postgresql_url():
    result = run_cli("slots", "--url", "mongodb://127.0.0.1:1/app")
    assert_one_clear_line(result, "manages PostgreSQL replication slots")


def test_missing_url():
    result = run_cli("run", "tasks", env={"CHANGEFEED_URL": ""})
    assert result.returncode == 2 and "Missing option '--url'" in result.stderr


def test_unreachable_server():
    url = f"postgresql://postgres@127.0.0.1:{refused_port()}/postgres"
    assert_one_clear_line(run_cli("run", "tasks", "--url", url),
                          "cannot connect to PostgreSQL at 127.0.0.1", "refused")


def test_wal_level_not_logical_says_how_to_fix_it():
    with TemporaryPostgres(settings={"wal_level": "replica"}) as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE tasks (id int PRIMARY KEY)")
        assert_one_clear_line(
            run_cli("run", "tasks", "--url", server.dsn()),
            "wal_level is 'replica'", "ALTER SYSTEM SET wal_level = logical",
        )


def test_role_without_replication_privilege(pg_dsn, tasks):
    tasks.execute("CREATE ROLE plain LOGIN")
    url = pg_dsn.replace("postgres@", "plain@")
    assert_one_clear_line(run_cli("run", "tasks", "--url", url),
                          "lacks the REPLICATION privilege", "ALTER ROLE plain REPLICATION")


def test_slot_already_in_use(pg_dsn, tasks):
    """A slot another run streams from: the second run waits for it (a client that just died
    holds its slot for a moment), then fails with one line."""
    with start_cli("run", "tasks", "--url", pg_dsn) as first:
        first.wait_streaming()
        result = run_cli("run", "tasks", "--url", pg_dsn)
        assert first.stop()[0] == 0, first.stderr
    assert "waiting up to 10 s for it to be released" in result.stderr
    assert_exit(result, 3, "slot changefeed_tasks is in use by another process",
                "(still after 10.", "stop it, or use another --slot")


def test_a_run_waits_for_a_slot_its_dead_predecessor_still_holds(pg_dsn, tasks):
    """A supervisor restarts a run that crashed while the server still holds its slot (its
    walsender notices the dead client only when it next looks at the socket; held here by a
    bare replication connection): the new run waits, then streams what the slot kept."""
    made = run_cli("run", "tasks", "--url", pg_dsn, "--idle-timeout", "0.5")  # the slot
    assert made.returncode == 0, made.stderr
    holder = psycopg.connect(pg_dsn, autocommit=True, replication="database")
    try:
        holder.execute("START_REPLICATION SLOT changefeed_tasks LOGICAL 0/0"
                       " (proto_version '1', publication_names 'changefeed_tasks')")
        tasks.execute("INSERT INTO tasks (title) VALUES ('kept')")
        with start_cli("run", "tasks", "--url", pg_dsn, "--limit", "1") as run:
            run.wait_for_stderr("waiting up to 10 s for it to be released")
            holder.close()
            code, out = run.finish()
    finally:
        holder.close()
    assert code == 0, run.stderr
    assert [(line["type"], line["data"]["title"]) for line in json_lines(out)] == [
        ("insert", "kept")]


def test_unwritable_checkpoint(pg_dsn, tasks, tmp_path):
    bad = tmp_path / "missing-dir" / "cp.json"
    tasks.execute("INSERT INTO tasks (title) VALUES ('x')")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--checkpoint", str(bad),
                     "--idle-timeout", "0.5")
    # Slot created on this run: nothing to deliver yet, so nothing to save; a run that
    # delivers must fail clearly when it cannot save.
    tasks.execute("INSERT INTO tasks (title) VALUES ('y')")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--checkpoint", str(bad),
                     "--idle-timeout", "0.5")
    assert_one_clear_line(result, "cannot write checkpoint")


def test_demo_runs_on_a_throwaway_cluster():
    result = run_cli("demo", "--seconds", "2.5", timeout=90)
    assert result.returncode == 0, result.stderr
    deltas = [json.loads(line) for line in result.stdout.splitlines()]
    assert deltas[0] == {"type": "insert", "model": "tasks", "data": deltas[0]["data"]}
    assert deltas[0]["data"]["title"] == "try changefeed"
    assert len(deltas) >= 3 and {d["type"] for d in deltas} <= {"insert", "update", "delete"}


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    commands = [line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines()
                if line.strip()]
    assert commands == ["backfill", "demo", "drain", "run", "serve", "slots", "status"]


def test_idle_timeout_is_shown_and_until_idle_its_old_name_hidden(pg_dsn, tasks):
    help_text = run_cli("run", "--help").stdout
    assert "--idle-timeout SECONDS" in help_text and "--until-idle" not in help_text
    both = run_cli("run", "tasks", "--url", pg_dsn, "--idle-timeout", "1", "--until-idle", "1")
    assert_exit(both, 2, "--until-idle is the old name of --idle-timeout: give one")
    tasks.execute("INSERT INTO tasks (title) VALUES ('a')")
    old = run_cli("run", "tasks", "--url", pg_dsn, "--prefeed", "snapshot", "--until-idle",
                  "0.5", "-q")
    assert old.returncode == 0 and json_lines(old.stdout)[0]["data"]["title"] == "a"


def test_progress_reports_rate_and_lag_while_busy(monkeypatch, caplog):
    import io
    import logging
    from datetime import datetime, timedelta, timezone

    from changefeed import delivery
    from changefeed.cli.run import encoder
    from changefeed.testing import MemoryFeed, insert

    monkeypatch.setattr(delivery, "PROGRESS_SECONDS", 0.0)
    committed = datetime.now(timezone.utc) - timedelta(seconds=2)
    feed = MemoryFeed("t", endless=True,
                      changes=[insert("t", {"id": i}, committed_at=committed) for i in range(3)])
    out = io.BytesIO()
    with caplog.at_level(logging.INFO, logger="changefeed"):
        written = delivery.deliver(
            feed, delivery.LineOutput(out, encoder("delta", "T")), idle_timeout=0.5,
            progress=delivery.Progress(feed),
        ).count
    ended = datetime.now(timezone.utc)
    assert written == 3 and out.getvalue().count(b"\n") == 3
    messages = [r.getMessage() for r in caplog.records]
    # The lag is the age of the last commit when reported: 2 s, and however long the run took
    # (a loaded machine may pause it for a second or more).
    lags = [float(found[1]) for m in messages
            if (found := re.fullmatch(r"[\d,]+ changes, [\d,]+/s, lag (\d+\.\d) s", m))]
    assert lags and all(2.0 <= lag <= (ended - committed).total_seconds() + 0.05
                        for lag in lags), messages
    assert messages[-1].startswith("stopped after 3 changes")
    assert feed.acknowledged == 3


def test_output_is_buffered_even_when_python_runs_unbuffered(monkeypatch, tmp_path):
    # PYTHONUNBUFFERED=1 (common in containers) makes sys.stdout.buffer a raw file: writing
    # through it would cost one system call per change.
    import io

    from changefeed.delivery import buffered_stdout

    raw = open(tmp_path / "out", "wb", buffering=0)  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
    out = buffered_stdout()
    assert isinstance(out, io.BufferedIOBase)
    out.write(b'{"type": "insert"}\n')
    assert (tmp_path / "out").read_bytes() == b""  # held in the buffer ...
    out.flush()
    assert (tmp_path / "out").read_bytes() == b'{"type": "insert"}\n'  # ... until flushed
    raw.close()


# -- checks made before streaming -------------------------------------------------------------


def _missing_dir(tmp_path: Path) -> str:
    return str(tmp_path / "missing" / "file.jsonl")


def _under_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "file.jsonl")


@pytest.mark.parametrize("option, path_of, fragment", [
    ("--checkpoint", _missing_dir, "cannot write checkpoint"),
    ("--checkpoint", _under_a_file, "is not a directory"),
    ("--sink", _missing_dir, "cannot write --sink file"),
    ("--sink", lambda tmp_path: str(tmp_path), "it is a directory"),
    ("--sink", _under_a_file, "is not a directory"),
    ("--dead-letter", _missing_dir, "cannot write --dead-letter file"),
], ids=["checkpoint-missing-dir", "checkpoint-under-file", "sink-missing-dir", "sink-is-dir",
        "sink-under-file", "dead-letter-missing-dir"])
def test_unwritable_files_fail_before_anything_is_streamed(
    pg_dsn, tasks, tmp_path, option, path_of, fragment
):
    tasks.execute("INSERT INTO tasks (title) VALUES ('would be written first')")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--prefeed", "snapshot",
                     option, path_of(tmp_path))
    assert_one_clear_line(result, fragment)
    assert result.returncode == 2 and result.stdout == ""
    # Checked before connecting: a server that is not there is never reached.
    nowhere = f"postgresql://postgres@127.0.0.1:{refused_port()}/db"
    assert_one_clear_line(run_cli("run", "tasks", "--url", nowhere, option, path_of(tmp_path)),
                          fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_read_only_checkpoint_fails_before_anything_is_streamed(pg_dsn, tasks, tmp_path):
    checkpoint = tmp_path / "cp.json"
    checkpoint.write_text("{}")
    checkpoint.chmod(0o444)
    result = run_cli("run", "tasks", "--url", pg_dsn, "--checkpoint", str(checkpoint))
    assert_one_clear_line(result, "permission denied")


def test_a_libpq_conninfo_string_is_accepted(pg_dsn, tasks):
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    conninfo = make_conninfo(**conninfo_to_dict(pg_dsn))  # host=... port=... dbname=...
    assert "://" not in conninfo
    tasks.execute("INSERT INTO tasks (title) VALUES ('a'), ('b')")
    result = run_cli("run", "tasks", "--url", conninfo, "--prefeed", "snapshot", "--limit", "1",
                     "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["title"] == "a"
    # PostgreSQL's own options apply to it, and $CHANGEFEED_URL takes it too.
    result = run_cli("run", "tasks", "--slot", "from_conninfo", "--prefeed", "snapshot",
                     "--limit", "2", "-q", env={"CHANGEFEED_URL": conninfo})
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["data"]["title"] for line in result.stdout.splitlines()] == [
        "a", "b"
    ]


@pytest.mark.parametrize("url, fragment", [
    ("postgresql://[bad", "bad PostgreSQL URL"),
    ("postgresql://[::1/db", "bad PostgreSQL URL"),
    ("postgresql://127.0.0.1:99999/db", "port '99999' is not a number"),
    ("postgresql://127.0.0.1:-5/db", "port '-5' is not a number"),
    ("postgres://127.0.0.1/db?nosuch=1", 'invalid URI query parameter: "nosuch"'),
    ("host=127.0.0.1 nosuch=1", 'invalid connection option "nosuch"'),
    ("host=127.0.0.1 port=x dbname=db", "port 'x' is not a number"),
    ("host='127.0.0.1 dbname=db", "bad PostgreSQL URL"),
    ("mongodb://[bad/app", "bad MongoDB URL"),
    ("rethinkdb://[bad/app", "bad RethinkDB URL"),
    ("mongodb://127.0.0.1:notaport/app", "bad MongoDB URL"),
    ("rethinkdb://127.0.0.1:notaport/app", "bad RethinkDB URL"),
])
def test_malformed_urls_are_one_line(url, fragment):
    result = run_cli("run", "tasks", "--url", url)
    assert_one_clear_line(result, fragment)
    assert result.returncode == 2


def test_the_command_line_starts_without_what_only_some_commands_use():
    # Start-up is a short run's cost: the pipelines (multipipes, multiprocessing) load only
    # for a run with stages or a sink, urllib only for `changefeed status`.
    code = ("import sys, changefeed.cli, changefeed.cli.run, changefeed.backends.postgres;"
            " print(sorted(m for m in sys.modules"
            " if m.startswith(('changefeed.pipelines', 'urllib.request', 'http.client'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert loaded.strip() == "[]"
