"""Files never hold a partial line: a sink file, stdout redirected to a file, a dead-letter file
and a checkpoint on a disk that fills up (a real 128 KiB tmpfs), or past a file-size limit
(``RLIMIT_FSIZE``: EFBIG); and a partial line left by hand (as a killed run leaves one) is cut off
when the next run opens the file.

Every failure is one line (exit 5 for an output, 1 for the checkpoint), every line in the file
is whole JSON, and a run after space was freed delivers every committed change: nothing written
in part was acknowledged.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
from pathlib import Path

import pytest
from clitools import CHANGEFEED, assert_exit, run_cli

from changefeed.linefiles import append_whole, cut_partial_line

pytestmark = pytest.mark.postgres

ROWS = 400
"""Rows inserted: about 45 KB of delta lines, more than a small disk holds."""


@pytest.fixture
def small_disk():
    """A 128 KiB tmpfs, mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    directory = Path(tempfile.mkdtemp(prefix="changefeed-full-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k,mode=0777", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        directory.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
        directory.rmdir()


@pytest.fixture
def tasks(pg, pg_dsn):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    result = run_cli("run", "tasks", "--url", pg_dsn, "--until-idle", "0.3", "--quiet",
                     "--sink", os.devnull)  # the slot, so that every insert below is streamed
    assert result.returncode == 0, result.stderr
    with pg.transaction():
        for i in range(1, ROWS + 1):
            pg.execute("INSERT INTO tasks VALUES (%s, %s)", [i, f"task {i:04} " + "x" * 40])
    return pg


def whole_lines(path: Path) -> list[dict]:
    """The file's lines, each whole JSON; fails on a partial line."""
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n"), f"{path} ends with a partial line: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` bytes of free space; returns the filler file."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler


def ids(rows: list[dict]) -> set[int]:
    return {row["data"]["id"] for row in rows}


@pytest.mark.parametrize("extra", [[], ["--processes"]], ids=["in-process", "processes"])
def test_a_sink_file_on_a_full_disk_fails_in_one_line_and_loses_nothing(
        extra, pg_dsn, tasks, small_disk):
    out = small_disk / "out.jsonl"
    filler = fill(small_disk, 24 * 1024)
    args = ["run", "tasks", "--url", pg_dsn, "--sink", str(out), *extra]
    result = run_cli(*args, "--until-idle", "1")
    assert_exit(result, 5, "No space left on device (ENOSPC)")
    first = whole_lines(out)
    assert 0 < len(first) < ROWS
    filler.unlink()
    result = run_cli(*args, "--until-idle", "1")
    assert result.returncode == 0, result.stderr
    assert ids(whole_lines(out)) == set(range(1, ROWS + 1))


def test_stdout_appended_to_a_file_on_a_full_disk(pg_dsn, tasks, small_disk):
    out = small_disk / "out.jsonl"
    filler = fill(small_disk, 24 * 1024)
    args = [*CHANGEFEED, "run", "tasks", "--url", pg_dsn, "--until-idle", "1"]
    with open(out, "ab") as stdout:
        result = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                timeout=90)
    assert_exit(result, 5, "cannot write to stdout", "ENOSPC")
    assert 0 < len(whole_lines(out)) < ROWS
    filler.unlink()
    with open(out, "ab") as stdout:
        result = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                timeout=90)
    assert result.returncode == 0, result.stderr
    assert ids(whole_lines(out)) == set(range(1, ROWS + 1))


def test_a_full_disk_is_not_dead_lettered(pg_dsn, tasks, small_disk, tmp_path):
    # A sink that cannot write anything must not send every change to the dead letters (they
    # would be acknowledged without ever reaching the sink).
    out, letters = small_disk / "out.jsonl", tmp_path / "letters.jsonl"
    fill(small_disk, 24 * 1024)
    result = run_cli("run", "tasks", "--url", pg_dsn, "--sink", str(out), "--dead-letter",
                     str(letters), "--until-idle", "1")
    assert_exit(result, 5, "ENOSPC")
    assert whole_lines(letters) == []


def test_a_dead_letter_file_on_a_full_disk(pg_dsn, tasks, small_disk, tmp_path):
    out, letters = tmp_path / "out.jsonl", small_disk / "letters.jsonl"
    filler = fill(small_disk, 8 * 1024)
    stage = tmp_path / "odd_fails.py"
    stage.write_text("def odd_fails(change):\n"
                     "    if change.new['id'] % 2:\n"
                     "        raise ValueError('odd')\n"
                     "    return change\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = ["run", "tasks", "--url", pg_dsn, "--stage", "odd_fails:odd_fails", "--sink",
            str(out), "--dead-letter", str(letters), "--until-idle", "1"]
    result = run_cli(*args, env=env)
    assert_exit(result, 5, "dead-letter sink", "ENOSPC")
    whole_lines(letters)
    filler.unlink()
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert ids(whole_lines(out)) == set(range(2, ROWS + 1, 2))
    assert {row["change"]["new"]["id"] for row in whole_lines(letters)} == set(
        range(1, ROWS + 1, 2))


def test_a_checkpoint_on_a_full_disk_fails_in_one_line_and_keeps_the_last_one(
        pg_dsn, tasks, small_disk, tmp_path):
    checkpoint = small_disk / "checkpoint.json"
    out = tmp_path / "out.jsonl"
    args = ["run", "tasks", "--url", pg_dsn, "--sink", str(out), "--checkpoint", str(checkpoint)]
    result = run_cli(*args, "--limit", "100")
    assert result.returncode == 0, result.stderr
    saved = checkpoint.read_bytes()
    filler = fill(small_disk, 0)
    result = run_cli(*args, "--until-idle", "1")
    assert_exit(result, 1, "cannot save checkpoint", "ENOSPC")
    assert checkpoint.read_bytes() == saved  # the last position saved, whole
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint.json", "filler"]
    filler.unlink()
    result = run_cli(*args, "--until-idle", "1")
    assert result.returncode == 0, result.stderr
    assert ids(whole_lines(out)) == set(range(1, ROWS + 1))
    assert json.loads(checkpoint.read_text()) != json.loads(saved)


def limited(size: int):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


@pytest.mark.parametrize("where", ["sink", "stdout"])
def test_a_file_size_limit_efbig_is_one_line_and_cuts_nothing_whole(
        where, pg_dsn, tasks, tmp_path):
    out = tmp_path / "out.jsonl"
    args = [*CHANGEFEED, "run", "tasks", "--url", pg_dsn, "--until-idle", "1"]
    for attempt in ("limited", "free"):
        preexec = limited(20_000) if attempt == "limited" else None
        with open(out if where == "stdout" else os.devnull, "ab") as stdout:
            result = subprocess.run(
                [*args, *(["--sink", str(out)] if where == "sink" else [])], stdout=stdout,
                stderr=subprocess.PIPE, text=True, timeout=90, preexec_fn=preexec)
        if attempt == "limited":
            assert_exit(result, 5, "File too large (EFBIG)")
            assert 0 < len(whole_lines(out)) < ROWS and out.stat().st_size <= 20_000
        else:
            assert result.returncode == 0, result.stderr
    assert ids(whole_lines(out)) == set(range(1, ROWS + 1))


@pytest.mark.parametrize("where", ["sink", "stdout", "dead-letter"])
def test_a_partial_line_left_by_a_killed_run_is_cut_off(where, pg_dsn, tasks, tmp_path):
    out = tmp_path / "out.jsonl"
    torn = b'{"type": "insert", "model": "tasks", "data": {"id": 1, "title": "tas'
    out.write_bytes(b'{"kept": true}\n' + torn)
    args = [*CHANGEFEED, "run", "tasks", "--url", pg_dsn, "--until-idle", "1"]
    env = dict(os.environ)
    if where == "sink":
        args += ["--sink", str(out)]
    elif where == "dead-letter":
        (tmp_path / "all_fail.py").write_text("def all_fail(change):\n    raise ValueError\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
        args += ["--stage", "all_fail:all_fail", "--sink", os.devnull, "--dead-letter", str(out)]
    with open(out if where == "stdout" else os.devnull, "ab") as stdout:
        result = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                timeout=90, env=env)
    assert result.returncode == 0, result.stderr
    assert f"ended with a partial line of {len(torn)} bytes" in result.stderr
    rows = whole_lines(out)
    assert rows[0] == {"kept": True}
    found = {row["data"]["id"] if "data" in row else row["change"]["new"]["id"]
             for row in rows[1:]}
    assert found == set(range(1, ROWS + 1))


def test_append_whole_leaves_a_full_file_as_it_was(small_disk):
    path = small_disk / "lines"
    fill(small_disk, 16 * 1024)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        append_whole(fd, b"a" * 99 + b"\n")
        for size in (20 * 1024, 64 * 1024):  # bigger than what is left: written in part first
            with pytest.raises(OSError) as info:
                append_whole(fd, (b"b" * 99 + b"\n") * (size // 100))
            assert info.value.errno == 28
            assert path.read_bytes() == b"a" * 99 + b"\n"
        append_whole(fd, b"c\n")  # what fits still goes
        assert path.read_bytes().endswith(b"\nc\n")
    finally:
        os.close(fd)


def test_cut_partial_line_of_long_and_lineless_files(tmp_path):
    for content, kept in [
        (b"x" * 200_000, b""),  # no newline at all: nothing whole to keep
        (b"a\n" + b"y" * 200_000, b"a\n"),  # the partial line spans several reads
        (b"a\nb\n", b"a\nb\n"),  # whole: untouched
    ]:
        path = tmp_path / "f"
        path.write_bytes(content)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            assert cut_partial_line(fd, "f") == len(content) - len(kept)
        finally:
            os.close(fd)
        assert path.read_bytes() == kept
