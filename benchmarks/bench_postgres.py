"""Throughput of `changefeed run` against pg_recvlogical on the same logical-replication stream.

Workload: 200,000 row changes on a throwaway local cluster (inserts, then updates, then
deletes, 1,000 rows per transaction). Each consumer reads it from its own pgoutput slot,
created before the workload, to the same end: pg_recvlogical writes the raw stream to
/dev/null (no decoding at all, the floor), ``changefeed run`` decodes every change into Python
values and writes JSON deltas to /dev/null. Both run as child processes, timed from start to
exit, in alternating order over several rounds; the best round of each is compared (and the
medians, as shared machines make single rounds noisy).

``--variants`` adds ``changefeed run`` with a pipeline, each from slots of its own in the same
rounds, and prints each one's median as a ratio of the run without stages (``plain``):
``where`` (``--where 'id >= 0'``, which keeps every row: the decoder evaluates it on the direct
path), ``processes`` (the same with ``--processes``, which leaves no stage to move), ``sink``
(the same ``--where`` in a pipeline with a file sink: its stages and sink see batches of the
feed's own lines where the extension is built, `Change` objects otherwise), ``sink_processes``
(that pipeline with ``--processes``: the lines cross to the sink's process), ``pipe`` and
``pipe_processes`` (the same two writing to a pipe read by ``cat``, a sink that is not a
local file: in one process, a thread of its own runs it), ``heavy`` (a
CPU-heavy Python stage, `enrich`, with a file sink), ``heavy_processes`` (that with
``--processes``) and ``heavy_workers`` (that with ``--workers 2``: two copies of the stage's
process); a variant with ``--processes`` or ``--workers`` is also compared with its in-process
twin when both run.
``--shape narrow`` makes rows of an int key and a short text.

``--reference PYTHON`` (another checkout's venv python, e.g. ``../main/.venv/bin/python``) also
runs each variant with that checkout's changefeed in the same rounds (``ref:VARIANT``), and prints
this checkout's median as a ratio of the reference's.

Then peak RSS of ``changefeed run`` while it streams one 1,000,000-row transaction.

    .venv/bin/python benchmarks/bench_postgres.py [--rounds 7] [--big-rows 1000000]
        [--shape bench|narrow] [--variants plain,where,processes] [--reference PYTHON]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from changefeed.embedded import TemporaryPostgres, find_pg_bindir

TABLE = """CREATE TABLE bench (
    id int PRIMARY KEY, title text NOT NULL, done boolean NOT NULL, priority int,
    amount numeric(12, 2), created_at timestamptz NOT NULL)"""
NARROW_TABLE = "CREATE TABLE bench (id int PRIMARY KEY, title text NOT NULL)"
PER_TRANSACTION = 1000
SINK_FILE = f"/tmp/bench_postgres_{os.getpid()}.jsonl"
HEAVY_STAGE = ["--stage", "benchmarks.bench_postgres:enrich"]
VARIANTS = {"plain": [], "where": ["--where", "id >= 0"],
            "processes": ["--where", "id >= 0", "--processes"],
            "sink": ["--where", "id >= 0", "--sink", SINK_FILE],
            "sink_processes": ["--where", "id >= 0", "--sink", SINK_FILE, "--processes"],
            "heavy": [*HEAVY_STAGE, "--sink", SINK_FILE],
            "heavy_processes": [*HEAVY_STAGE, "--sink", SINK_FILE, "--processes"],
            "heavy_workers": [*HEAVY_STAGE, "--sink", SINK_FILE, "--workers", "2"],
            "pipe": ["--where", "id >= 0", "--sink", "/dev/stdout"],
            "pipe_processes": ["--where", "id >= 0", "--sink", "/dev/stdout", "--processes"]}
PIPED = ("pipe", "pipe_processes")
"""Variants whose sink writes to a pipe (read by ``cat``): not a local file, so that the
in-process pipeline hands its batches to a sink thread."""


def enrich(change: Any) -> Any:
    """The CPU-heavy stage of the ``heavy`` variants: Python work per change (a checksum of the
    row's text, as an enrichment or a scrubbing stage would compute something), ~20 µs here;
    the change goes on unchanged."""
    text = repr(change.row) * 4
    checksum = 0
    for index, char in enumerate(text):
        checksum = (checksum * 31 + ord(char) * index) & 0xFFFFFFFF
    return change if checksum >= 0 else None


def make_workload(conn: psycopg.Connection, changes: int, narrow: bool = False) -> None:
    """Inserts, then updates of half of them, then deletes of the other half."""
    rows = changes // 2
    for start in range(0, rows, PER_TRANSACTION):
        with conn.transaction():
            conn.execute(
                "INSERT INTO bench SELECT g, 'task ' || g FROM generate_series(%s::int, %s::int) g"
                if narrow else
                "INSERT INTO bench SELECT g, 'task ' || g, false, g %% 5, g * 1.25, now()"
                " FROM generate_series(%s::int, %s::int) g",
                [start + 1, min(start + PER_TRANSACTION, rows)],
            )
    for start in range(0, rows // 2, PER_TRANSACTION):
        with conn.transaction():
            conn.execute(
                ("UPDATE bench SET title = title || '!'" if narrow else
                 "UPDATE bench SET done = true, priority = priority + 1")
                + " WHERE id BETWEEN %s AND %s", [start + 1, start + PER_TRANSACTION]
            )
    for start in range(rows // 2, rows, PER_TRANSACTION):
        with conn.transaction():
            conn.execute(
                "DELETE FROM bench WHERE id BETWEEN %s AND %s", [start + 1, start + PER_TRANSACTION]
            )


def compile_checkouts(reference: str | None) -> None:
    """Byte-compile this checkout's package (the current folder's) and the one of
    ``reference`` (another checkout's venv python), to time the tool as installed: a regular
    install byte-compiles the package, while an editable one under PYTHONDONTWRITEBYTECODE
    (set on some machines) would compile every module from source at each start."""
    roots = [Path.cwd()]
    if reference:
        roots.append(Path(reference).absolute().parent.parent.parent)
    for root in roots:
        for package in ("changefeed", "backends", "pipelines"):
            compileall.compile_dir(str(root / package), quiet=1)


def timed(
    argv: list[str], stdout: int | None = subprocess.DEVNULL, cwd: Path | None = None
) -> tuple[float, float, int]:
    """Run ``argv`` (in ``cwd``); return (seconds, CPU seconds, peak RSS in kB) of that child
    alone."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    stderr = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed: {stderr}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def changefeed_argv(dsn: str, slot: str, publication: str, limit: int,
                    python: str = sys.executable) -> list[str]:
    return [python, "-m", "changefeed", "run", "bench", "--url", dsn, "--slot", slot,
            "--publication", publication, "--limit", str(limit), "--quiet"]


def recvlogical_argv(dsn: str, slot: str, publication: str, end_lsn: str) -> list[str]:
    binary = shutil.which("pg_recvlogical") or str(find_pg_bindir() / "pg_recvlogical")
    return [binary, "-d", dsn, "--slot", slot, "--start", "--no-loop", "-E", end_lsn,
            "-o", "proto_version=1", "-o", f"publication_names={publication}", "-f", "/dev/null"]


def throughput(server: TemporaryPostgres, changes: int, rounds: int, narrow: bool = False,
               variants: tuple[str, ...] = (), reference: str | None = None) -> None:
    dsn = server.dsn()
    kinds = ("changefeed", "recvlogical", *variants)
    if reference:
        kinds += tuple(f"ref:{kind}" for kind in ("plain", *variants))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(NARROW_TABLE if narrow else TABLE)
        conn.execute("CREATE PUBLICATION bench FOR TABLE bench")
        slots = []
        for number in range(rounds):
            for kind in kinds:
                slot = f"{kind.replace(':', '_')}_{number}"
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
                slots.append(slot)
        started = time.perf_counter()
        make_workload(conn, changes, narrow)
        (end_lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        print(f"workload: {changes:,} changes in {time.perf_counter() - started:.1f} s,"
              f" end LSN {end_lsn}")
        conn.execute("CHECKPOINT")

    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    for number in range(rounds):
        order = kinds if number % 2 == 0 else kinds[::-1]
        for label in order:
            slot = f"{label.replace(':', '_')}_{number}"
            python, kind, cwd = sys.executable, label, None
            if label.startswith("ref:") and reference:
                # From its own checkout: the package (and the stages) it imports are its own.
                python, kind = reference, label.removeprefix("ref:")
                cwd = Path(reference).absolute().parent.parent.parent
            argv = changefeed_argv(dsn, slot, "bench", changes, python)
            if kind in ("changefeed", "plain"):
                seconds, cpu, _ = timed(argv, cwd=cwd)
            elif kind == "recvlogical":
                seconds, cpu, _ = timed(recvlogical_argv(dsn, slot, "bench", end_lsn))
            elif kind in PIPED:
                seconds, cpu, _ = timed(["sh", "-c", '"$@" | cat > /dev/null', "sh",
                                         *argv, *VARIANTS[kind]], cwd=cwd)
            else:
                seconds, cpu, _ = timed(argv + VARIANTS[kind], cwd=cwd)
                if os.path.exists(SINK_FILE):
                    os.unlink(SINK_FILE)
            results[label].append(seconds)
            rate = changes / seconds
            print(f"round {number + 1}: {label:18} {seconds:6.2f} s  {rate:10,.0f} rows/s"
                  f"  (CPU {cpu:.2f} s)")
    best_cf = min(results["changefeed"])
    best_pg = min(results["recvlogical"])
    print(f"\nbest of {rounds}: changefeed {changes / best_cf:,.0f} rows/s,"
          f" pg_recvlogical {changes / best_pg:,.0f} rows/s")
    median_ratio = statistics.median(results["recvlogical"]) / statistics.median(
        results["changefeed"]
    )
    print(f"ratio changefeed / pg_recvlogical: {best_pg / best_cf:.2f}"
          f" (of the medians: {median_ratio:.2f})")
    for kind in variants:
        print(f"{kind}: median {changes / statistics.median(results[kind]):,.0f} rows/s,"
              f" {statistics.median(results['changefeed']) / statistics.median(results[kind]):.2f}x"
              f" the run without stages (best rounds:"
              f" {best_cf / min(results[kind]):.2f}x)")
    for kind in variants:
        twin = kind.removesuffix("_processes").removesuffix("_workers")
        if twin != kind and twin in variants:
            speedup = statistics.median(results[twin]) / statistics.median(results[kind])
            print(f"{kind}: {speedup:.2f}x the same pipeline in one process (medians)")
    if reference:
        for kind in ("changefeed", *variants):
            ref = "ref:plain" if kind == "changefeed" else f"ref:{kind}"
            ratio = statistics.median(results[ref]) / statistics.median(results[kind])
            print(f"{kind}: {ratio:.2f}x the reference's speed (medians)")
        for kind in variants:
            twin = kind.removesuffix("_processes").removesuffix("_workers")
            if twin != kind and twin in variants:
                speedup = (statistics.median(results[f"ref:{twin}"])
                           / statistics.median(results[f"ref:{kind}"]))
                print(f"reference {kind}: {speedup:.2f}x the same pipeline in one process"
                      " (medians)")


def memory(server: TemporaryPostgres, rows: int) -> None:
    dsn = server.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, title text, created_at timestamptz)")
        conn.execute("CREATE PUBLICATION big FOR TABLE big")
        conn.execute("SELECT pg_create_logical_replication_slot('big', 'pgoutput')")
        conn.execute(
            "INSERT INTO big SELECT g, 'row ' || g, now() FROM generate_series(1, %s) g", [rows]
        )
    argv = [sys.executable, "-m", "changefeed", "run", "big", "--url", dsn, "--slot", "big",
            "--publication", "big", "--limit", str(rows), "--quiet"]
    seconds, _, peak_kb = timed(argv)
    print(f"\none transaction of {rows:,} rows: {seconds:.1f} s"
          f" ({rows / seconds:,.0f} rows/s), peak RSS {peak_kb / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--big-rows", type=int, default=1_000_000)
    parser.add_argument("--shape", choices=["bench", "narrow"], default="bench")
    parser.add_argument("--variants", default="",
                        help="pipelines to compare with the plain run: " + ", ".join(
                            kind for kind in VARIANTS if kind != "plain"))
    parser.add_argument("--reference", metavar="PYTHON", default=None,
                        help="another checkout's venv python: its changefeed runs as well")
    args = parser.parse_args()
    variants = tuple(kind for kind in args.variants.split(",") if kind and kind != "plain")
    for kind in variants:
        if kind not in VARIANTS:
            raise SystemExit(f"unknown variant {kind!r}")
    os.chdir(Path(__file__).resolve().parent.parent)
    compile_checkouts(args.reference)
    # A slot (and a walsender) per consumer and round, created before the workload.
    slots = str(max(20, args.rounds * (2 * len(variants) + 3) + 4))
    with TemporaryPostgres({"max_replication_slots": slots, "max_wal_senders": slots}) as server:
        throughput(server, args.changes, args.rounds, args.shape == "narrow", variants,
                   args.reference)
        if args.big_rows:
            memory(server, args.big_rows)


if __name__ == "__main__":
    main()
