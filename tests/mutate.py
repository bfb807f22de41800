"""Mutation testing of the modules that carry the delivery guarantees (``make mutate``).

mutmut 2 changes a source file in place, runs a test command, and counts a mutant as killed
when the command fails. It runs here on a copy of the work tree (``.tmp/mutate``), never on
the tree itself, so other test runs are not disturbed. The package is installed editable with
a ``package_dir`` mapping (``backends/`` is ``changefeed.backends``); in the copy,
``changefeed/backends`` and ``changefeed/pipelines`` are symbolic links to the top-level
folders and the copy comes first on ``PYTHONPATH``, so the tests (and the ``changefeed``
processes they start) import the mutated files. The script checks that before it starts.

Only the functions named below are mutated (through a patch file listing their lines), each
with the tests that guard it; the PostgreSQL ones run against a real server, so they are kept
to a small subset (the back-fill's state machine is tested without a server first, with
acknowledgements that lag, then on a server). Usage::

    .venv-mutmut/bin/python tests/mutate.py [TARGET ...]     # default: every target
    cd .tmp/mutate && ../../.venv-mutmut/bin/mutmut show ID  # a survivor's diff

Known limit: mutmut 2.5.1 once failed to record a mutant of ``_advance`` that hangs (``break``
made ``continue``: ``ValueError: Attribute Mutant.line is required``) and its worker stopped.
The mutants left "untested" can be run by hand in ``.tmp/mutate``: ``mutmut apply ID``, then
``sh .mutmut-ledger.sh`` (exit 1: killed), then copy the original file back.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ROOT / ".tmp" / "mutate"
PYTHON = ROOT / ".venv" / "bin" / "python"
MUTMUT = ROOT / ".venv-mutmut" / "bin" / "mutmut"

G = "tests/test_guarantees.py::test_"
PG_LEDGER_TESTS = " ".join([
    f"{G}a_restart_from_the_checkpoint_inside_a_transaction_continues_exactly_after_it[17]",
    f"{G}a_restart_from_the_checkpoint_inside_a_transaction_continues_exactly_after_it[256]",
    f"{G}a_partly_acknowledged_transaction_comes_again_whole_without_the_checkpoint[17]",
    f"{G}the_ledger_moves_the_slot_past_each_transaction_fully_acknowledged",
    f"{G}the_ledger_keeps_a_transaction_read_past_its_commit_until_its_last_change_is_acked[10]",
    f"{G}the_ledger_without_checkpoint_replays_a_transaction_read_past_its_commit[19]",
    f"{G}the_ledger_acknowledges_nothing_of_a_transaction_read_but_not_acknowledged",
    f"{G}the_ledger_with_a_mask_that_drops_the_end_of_a_transaction",
    "tests/backends/test_postgres.py::test_an_acknowledgement_after_the_stream_closed_still_"
    "moves_the_slot",
    "tests/backends/test_postgres.py::test_a_snapshot_cut_short_continues_after_its_last_"
    "delivered_chunk",
    "tests/backends/test_postgres.py::test_an_exported_snapshot_cut_short_is_taken_again",
])
"""A small subset of the PostgreSQL tests (about half a minute), for the acknowledgement ledger."""
M = "tests/backends/test_messages.py::test_"
PURE_MESSAGE_TESTS = " ".join([
    f"{M}a_transactional_message_takes_its_place_among_the_rows",
    f"{M}a_non_transactional_message_ending_where_a_commit_starts_comes_before_it",
    f"{M}a_non_transactional_message_has_its_own_position_between_transactions",
])
"""The message tests that need no server (the positions of messages)."""

L = "tests/test_lagging_acks.py::test_"
PG_BACKFILL_TESTS = " ".join(map(shlex.quote, [
    f"{L}a_chunk_acknowledged_late_records_its_own_last_key_not_the_next_chunks",
    f"{L}snapshot_chunks_acknowledged_late_resume_after_the_last_acknowledged_chunk[10-15-25-"
    "primary key]",
    f"{L}snapshot_chunks_acknowledged_late_resume_after_the_last_acknowledged_chunk[10-12-20-"
    "no key]",
    "tests/backends/test_postgres.py::test_a_snapshot_of_a_table_without_key_cut_short_"
    "continues_after_its_last_chunk",
]))
"""A few back-fill tests on a real server (half a minute): acknowledgements that lag. Quoted:
the runner is a shell script, and test ids hold spaces."""
PG_SNAPSHOT_TESTS = " ".join(map(shlex.quote, [
    "tests/backends/test_postgres.py::test_an_exported_snapshot_cut_short_is_taken_again",
    "tests/backends/test_postgres.py::test_a_snapshot_of_a_table_without_key_cut_short_"
    "continues_after_its_last_chunk",
    "tests/test_guarantees_tables.py::test_every_kind_of_identity_gives_the_same_key_in_"
    "snapshot_and_stream[identity index-exported]",
    "tests/test_guarantees_tables.py::test_every_kind_of_identity_gives_the_same_key_in_"
    "snapshot_and_stream[FULL without key-chunked]",
]))
"""The snapshot readers on a real server: exported and chunked, keys of every kind."""

TARGETS: dict[str, tuple[str, list[str], str]] = {
    # name: (file, functions or classes ("Class.method" or "Class"), tests)
    "acks": ("changefeed/feed.py", ["ChangeFeed.ack", "ChangeFeed.__iter__"],
             "tests/test_feed.py tests/test_acks.py"),
    "throttle": ("changefeed/delivery.py", ["ThrottledAcks"], "tests/test_acks.py"),
    "operations": ("changefeed/change.py", ["Operation"],
                   "tests/test_change.py tests/test_feed.py tests/test_acks.py"),
    "checkpoint": ("changefeed/checkpoint.py", ["MemoryCheckpoint", "FileCheckpoint"],
                   "tests/test_checkpoint.py"),
    "positions": ("backends/postgres/position.py",
                  ["PgPosition", "TransactionPositions", "make_position", "parse_position"],
                  "tests/backends/test_postgres_position.py tests/backends/test_pgoutput.py"
                  " tests/test_acks.py"),
    "decoder-positions": ("backends/postgres/pgoutput.py",
                          ["PgOutputDecoder.decode:_positions",
                           "PgOutputDecoder._insert:positions",
                           "PgOutputDecoder._update:positions",
                           "PgOutputDecoder._delete:positions",
                           "PgOutputDecoder._message:position"],
                          "tests/backends/test_pgoutput.py tests/test_acks.py "
                          + PURE_MESSAGE_TESTS),
    "lsns": ("backends/postgres/protocol.py", ["format_lsn", "parse_lsn"],
             "tests/backends/test_postgres_protocol.py tests/test_acks.py"),
    "filters": ("pipelines/filters.py", ["get_field", "compile_filter", "_comparison",
                                         "filter_fields"],
                "tests/pipelines/test_stages.py tests/pipelines/test_filters.py"),
    "ledger": ("backends/postgres/ledger.py", ["AckLedger.advance", "AckLedger.acknowledge"],
               "tests/backends/test_postgres_protocol.py " + PG_LEDGER_TESTS),
    "chunks": ("backends/postgres/chunks.py",
               ["key_token", "_token", "parse_tid", "TableBackfill", "next_ctid_chunk",
                "pages_for", "ChunkWindow", "requested_tables", "window_changes"],
               "tests/backends/test_postgres_chunks.py"),
    "backfill": ("backends/postgres/backfill.py",
                 ["Backfills.start", "Backfills.renamed", "Backfills.observe",
                  "Backfills.on_message", "Backfills._watermark", "Backfills.committed",
                  "Backfills.confirmed", "Backfills.reset", "chunk_state", "_adapt_pages",
                  "backfill_states"],
                 "tests/backends/test_postgres_chunks.py " + PG_BACKFILL_TESTS),
    "snapshot": ("backends/postgres/snapshot.py",
                 ["row_bytes", "BoundedFetch", "exported_change",
                  "ExportedChanges"],
                 "tests/backends/test_postgres_chunks.py " + PG_SNAPSHOT_TESTS),
}


def line_ranges(path: Path, names: list[str]) -> set[int]:
    """The line numbers of the named top-level functions, classes or methods.

    ``Class.method:word`` keeps only the lines of that method containing ``word``.
    """
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    found: set[int] = set()
    for name in names:
        name, _, word = name.partition(":")
        parts = name.split(".")
        scope: list[ast.stmt] = tree.body
        node = None
        for part in parts:
            node = next(n for n in scope if getattr(n, "name", None) == part)
            scope = getattr(node, "body", [])
        assert node is not None and node.end_lineno is not None
        for number in range(node.lineno, node.end_lineno + 1):
            if not word or word in lines[number - 1]:
                found.add(number)
    return found


def patch_for(relative: str, numbers: set[int]) -> str:
    """A unified diff that 'adds' exactly ``numbers`` to ``relative`` (what mutmut mutates)."""
    lines = (COPY / relative).read_text().splitlines()
    hunks = []
    for number in sorted(numbers):
        # One hunk per line: the line is added to a file that lacked it.
        hunks.append(f"@@ -{number - 1},0 +{number},1 @@\n+{lines[number - 1]}\n")
    return f"--- a/{relative}\n+++ b/{relative}\n" + "".join(hunks)


def make_copy() -> None:
    if COPY.exists():
        shutil.rmtree(COPY)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.splitlines()
    for relative in files:
        source = ROOT / relative
        if source.is_file():
            target = COPY / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    os.symlink("../backends", COPY / "changefeed" / "backends")
    os.symlink("../pipelines", COPY / "changefeed" / "pipelines")


def check_imports(env: dict[str, str]) -> None:
    code = (
        "import changefeed.feed, changefeed.backends.postgres.feed, changefeed.pipelines.filters;"
        "print(changefeed.feed.__file__, changefeed.backends.postgres.feed.__file__,"
        " changefeed.pipelines.filters.__file__)"
    )
    out = subprocess.run([str(PYTHON), "-c", code], cwd=COPY, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    for path in out:
        assert Path(path).resolve().is_relative_to(COPY.resolve()), f"tests would import {path}"


def main(names: list[str]) -> None:
    make_copy()
    env = {**os.environ, "PYTHONPATH": str(COPY), "PYTHONDONTWRITEBYTECODE": "1"}
    check_imports(env)
    for name in names or list(TARGETS):
        relative, functions, tests = TARGETS[name]
        patch = COPY / f".mutmut-{name}.patch"
        patch.write_text(patch_for(relative, line_ranges(COPY / relative, functions)))
        # mutmut 2 counts only exit code 1 as a failure: a mutant that breaks the import
        # (pytest exits 2) would "survive". A script turns any failure into 1 (mutmut runs the
        # runner without a shell).
        # A mutant that hangs is interrupted (SIGINT: pytest still stops its PostgreSQL) and
        # counts as killed. Output goes to /dev/null: mutmut reads the runner's terminal to its
        # end, which a server started by the tests must not hold open.
        script = COPY / f".mutmut-{name}.sh"
        seconds = 300 if name in ("ledger", "backfill", "snapshot") else 30
        script.write_text(
            f"timeout -s INT -k 30 {seconds} {PYTHON} -m pytest -x -q -p no:cacheprovider"
            f" {tests} >/dev/null 2>&1 </dev/null || exit 1\n"
        )
        runner = f"sh {script}"
        forget_baseline()  # mutmut would time every target's mutants by the first one's tests
        print(f"== {name}: {relative} {functions}\n   runner: {runner}", flush=True)
        subprocess.run(
            ["nice", str(MUTMUT), "run", "--paths-to-mutate", relative, "--tests-dir", "tests",
             "--runner", runner, "--use-patch-file", str(patch), "--no-progress",
             "--simple-output"],
            cwd=COPY, env=env,
        )
    summary(env)


def forget_baseline() -> None:
    cache = COPY / ".mutmut-cache"
    if cache.exists():
        with sqlite3.connect(cache) as db:
            db.execute("DELETE FROM MiscData WHERE key = 'baseline_time_elapsed'")


def summary(env: dict[str, str]) -> None:
    """Mutants per file and status, then the diff of every survivor."""
    with sqlite3.connect(COPY / ".mutmut-cache") as db:
        counts = db.execute(
            "SELECT s.filename, m.status, count(*) FROM Mutant m JOIN Line l ON m.line = l.id"
            " JOIN SourceFile s ON l.sourcefile = s.id GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        survivors = [row[0] for row in db.execute(
            "SELECT id FROM Mutant WHERE status = 'bad_survived' ORDER BY id")]
    print("\n== mutants per file (ok_suspicious: killed, slowly)")
    for filename, status, count in counts:
        print(f"   {filename:34} {status:15} {count}")
    for mutant in survivors:
        shown = subprocess.run([str(MUTMUT), "show", str(mutant)], cwd=COPY, env=env,
                               capture_output=True, text=True).stdout
        print(f"\n-- survivor {mutant}\n" + "\n".join(
            line for line in shown.splitlines() if line.startswith(("---", "+", "-", "@@"))))


if __name__ == "__main__":
    main(sys.argv[1:])
