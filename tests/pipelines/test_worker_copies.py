"""``changefeed run --workers N``: a stage's process runs in N copies, on a real server.

The stage sleeps in proportion to a row's ``cost`` column, and where a test says so the first
row waits until another copy logged a later chunk's change (``COPIES_HOLD_UNTIL``: a condition,
not a time, so a slow or loaded machine cannot finish the first chunk first): the tests check
from the stage's own log that chunks really finished out of the feed's order, and that the
sink's file still holds the bytes of the in-process run, in the feed's order. A stage failing in
one copy, a copy killed, and dead letters keep their guarantees: what was written is a prefix of
that run, acknowledged exactly, and the next run resumes with the first change not written.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from clitools import CHANGEFEED

pytestmark = pytest.mark.postgres

STAGE = '''
import os
import signal
import time


def costly(change):
    """Sleeps ``cost`` ms; fails, dies or logs as the test's environment says."""
    row = change.row
    number = row["id"]
    cost = row.get("cost") or 0
    if cost:
        time.sleep(cost / 1000)
    log = os.environ.get("COPIES_LOG")
    if number == 1 and "COPIES_HOLD_UNTIL" in os.environ:
        _hold(log, os.environ["COPIES_HOLD_UNTIL"])
    if os.environ.get("COPIES_FAIL_AT") == str(number):
        if log:
            _note(log, f"{os.getpid()} {change.operation.name.lower()} {number} failed")
        raise ValueError(f"row {number} is bad")
    if os.environ.get("COPIES_KILL_AT") == str(number):
        os.kill(os.getpid(), signal.SIGKILL)
    bad_every = int(os.environ.get("COPIES_BAD_EVERY") or 0)
    if bad_every and number % bad_every == 0:
        raise ValueError(f"row {number} is bad")
    if log:
        _note(log, f"{os.getpid()} {change.operation.name.lower()} {number}")
    return change


def _hold(path, until, seconds=60.0):
    """Wait until a line of the log at ``path`` holds ``until`` ("": any line), written by
    another copy (this one logged nothing yet), or ``seconds`` passed: the test then fails."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(path) as file:
                if any(until in line for line in file):
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.01)


def _note(path, line):
    with open(path, "a") as file:  # one write(2) of a short line: processes do not tear it
        file.write(line + "\\n")
'''

SLOW = {1: 400, 1002: 200, 2003: 100}
"""The rows whose stage is slow (ms): the first of the first three chunks of 1,000."""


@pytest.fixture
def stream(pg):
    """A table, its publication, slots made before its changes (``(table, slots)``): 3,000
    inserts in three transactions, updates of 500 rows, deletes of 200."""
    name = f"copies_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, cost int, title text)")
    pg.execute(f"ALTER TABLE {name} REPLICA IDENTITY FULL")
    pg.execute(f"CREATE PUBLICATION {name} FOR TABLE {name}")
    slots = [f"{name}_{number}" for number in range(4)]
    for slot in slots:
        pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    costs = " ".join(f"WHEN {row} THEN {ms}" for row, ms in SLOW.items())
    for start in (1, 1001, 2001):
        pg.execute(f"INSERT INTO {name} SELECT g, CASE g {costs} ELSE 0 END, 'task ' || g"
                   " FROM generate_series(%s::int, %s::int) g", [start, start + 999])
    pg.execute(f"UPDATE {name} SET title = title || ' é' WHERE id BETWEEN 2201 AND 2700")
    pg.execute(f"DELETE FROM {name} WHERE id BETWEEN 2801 AND 3000")
    return name, slots


@pytest.fixture
def stage_path(tmp_path):
    (tmp_path / "copies_stage.py").write_text(STAGE)
    return tmp_path


def run(dsn: str, table: str, slot: str, out: Path, stage_path: Path, *options: str,
        impl: str = "c", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CHANGEFEED, "run", table, "--url", dsn, "--slot", slot, "--publication", table,
         "--stage", "copies_stage:costly", "--sink", str(out), "--idle-timeout", "1", "--quiet",
         *options],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "CHANGEFEED_IMPL": impl, "PYTHONPATH": os.pathsep.join(
            [str(stage_path), os.environ.get("PYTHONPATH", "")]), **env})


def order_of(lines: list[str]) -> dict[tuple[str, int], int]:
    """Each change's place in the feed's order, from the deltas the in-process run wrote."""
    return {(delta["type"], (delta.get("data") or delta.get("newData"))["id"]): index
            for index, delta in enumerate(json.loads(line) for line in lines)}


def finished(log: Path, order: dict[tuple[str, int], int]) -> tuple[set[int], list[int]]:
    """The processes the stage ran in, and the places of the changes in the order it finished
    them."""
    pids, places = set(), []
    for line in log.read_text().splitlines():
        pid, operation, number = line.split()[:3]
        pids.add(int(pid))
        places.append(order[(operation, int(number))])
    return pids, places


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("copies", [2, 3])
def test_copies_write_the_bytes_of_the_in_process_run_in_the_feed_s_order(
        pg_dsn, stream, stage_path, tmp_path, copies, impl):
    table, slots = stream
    reference = tmp_path / "reference.jsonl"
    result = run(pg_dsn, table, slots[0], reference, stage_path, impl=impl)
    assert result.returncode == 0, result.stderr
    expected = reference.read_text().splitlines()
    assert len(expected) == 3700
    order = order_of(expected)
    out, log = tmp_path / "out.jsonl", tmp_path / "stage.log"
    result = run(pg_dsn, table, slots[1], out, stage_path, "--workers", str(copies), impl=impl,
                 COPIES_LOG=str(log), COPIES_HOLD_UNTIL="")  # row 1 waits for a later chunk
    assert result.returncode == 0, result.stderr
    pids, places = finished(log, order)
    assert len(pids) >= 2  # the copies shared the work...
    assert places != sorted(places)  # ... and finished chunks out of the feed's order
    assert sorted(places) == list(range(3700))
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("copies", [2, 3])
def test_a_stage_failing_in_one_copy_stops_after_what_came_before_and_resumes_exactly(
        pg_dsn, stream, stage_path, tmp_path, copies):
    """Row 1500 (the second chunk) fails in one copy while another still works on the first
    chunk (its row 1 waits for that failure): the failure waits for it, the sink writes rows
    1..1499 and nothing after, the run fails naming the change, and the next run (the stage
    fixed) writes the rest, once."""
    table, slots = stream
    reference = tmp_path / "reference.jsonl"
    assert run(pg_dsn, table, slots[0], reference, stage_path).returncode == 0
    expected = reference.read_text().splitlines(keepends=True)
    order = order_of(expected)
    out, log = tmp_path / "out.jsonl", tmp_path / "stage.log"
    # A checkpoint holds positions inside a transaction (a slot, only whole transactions).
    checkpoint = ("--checkpoint", str(tmp_path / "checkpoint"))
    result = run(pg_dsn, table, slots[1], out, stage_path, "--workers", str(copies),
                 *checkpoint, COPIES_FAIL_AT="1500", COPIES_LOG=str(log),
                 COPIES_HOLD_UNTIL="failed")  # row 1 waits for the failure
    assert result.returncode != 0
    assert "stage costly failed on the change at position" in result.stderr, result.stderr
    assert "row 1500 is bad" in result.stderr
    lines = log.read_text().splitlines()
    failed = next(index for index, line in enumerate(lines) if line.endswith("failed"))
    first = lines.index(next(line for line in lines if line.split()[1:3] == ["insert", "1"]))
    assert failed < first  # the failure came before the first chunk was done: it waited
    assert out.read_text() == "".join(expected[:order[("insert", 1500)]])
    result = run(pg_dsn, table, slots[1], out, stage_path, "--workers", str(copies),
                 *checkpoint)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == reference.read_bytes()  # nothing lost, nothing twice


def test_a_copy_killed_mid_run_is_one_clear_error_and_the_next_run_resumes_exactly(
        pg_dsn, stream, stage_path, tmp_path):
    table, slots = stream
    reference = tmp_path / "reference.jsonl"
    assert run(pg_dsn, table, slots[0], reference, stage_path).returncode == 0
    expected = reference.read_bytes()
    out = tmp_path / "out.jsonl"
    checkpoint = ("--checkpoint", str(tmp_path / "checkpoint"))
    result = run(pg_dsn, table, slots[1], out, stage_path, "--workers", "2", *checkpoint,
                 COPIES_KILL_AT="1500")
    assert result.returncode == 5, result.stderr  # a pipeline's failure
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()
              or "died" in line]
    assert len(errors) == 1, result.stderr
    assert "one of the 2 processes running costly" in errors[0]
    assert "died with exit code -9" in errors[0]
    written = out.read_bytes() if out.exists() else b""
    assert expected.startswith(written)  # nothing after the lost chunk, nothing out of order
    assert written.count(b"\n") <= 1499
    result = run(pg_dsn, table, slots[1], out, stage_path, "--workers", "2", *checkpoint)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == expected


@pytest.mark.parametrize("impl", ["c", "python"])
def test_dead_letters_with_copies_are_those_of_the_in_process_run(
        pg_dsn, stream, stage_path, tmp_path, impl):
    table, slots = stream
    outputs = {}
    for slot, options in ((slots[0], ()), (slots[1], ("--workers", "3"))):
        out, dead = tmp_path / f"{slot}.jsonl", tmp_path / f"{slot}.dead.jsonl"
        result = run(pg_dsn, table, slot, out, stage_path, "--dead-letter", str(dead),
                     *options, impl=impl, COPIES_BAD_EVERY="250")
        assert result.returncode == 0, result.stderr
        letters = [json.loads(line) for line in dead.read_text().splitlines()]
        outputs[slot] = out.read_bytes(), [
            (d["change"]["operation"], (d["change"]["new"] or d["change"]["old"])["id"],
             d["stage"], d["error"]) for d in letters]
    assert outputs[slots[1]] == outputs[slots[0]]
    delivered, letters = outputs[slots[0]]
    assert [(operation, number) for operation, number, _, _ in letters] == (
        [("insert", number) for number in range(250, 3001, 250)]
        + [("update", 2250), ("update", 2500), ("delete", 3000)])
    assert delivered.count(b"\n") == 3700 - 15
