"""Snapshot throughput of `changefeed run --prefeed snapshot` against COPY of the same table.

A table of 1,000,000 rows on a throwaway local cluster. ``COPY big TO STDOUT`` through psql into
/dev/null is the limit (the server formats the rows, nothing decodes them); changefeed reads the
table in primary-key chunks between watermarks (see `changefeed.backends.postgres.backfill`),
turns every row into Python values and writes JSON lines to /dev/null. Both run as child
processes, timed from start to exit, in alternating order; the best and the median rounds are
compared. The peak RSS of changefeed shows that a snapshot holds one chunk, not the table.

    .venv/bin/python benchmarks/bench_snapshot.py [--rows 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_postgres import timed  # noqa: E402  (a script beside this one)

from changefeed.embedded import TemporaryPostgres, find_pg_bindir  # noqa: E402

TABLE = """CREATE TABLE big (
    id int PRIMARY KEY, title text NOT NULL, done boolean NOT NULL, priority int,
    amount numeric(12, 2), created_at timestamptz NOT NULL)"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=5000)
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    for package in ("changefeed", "backends", "pipelines"):
        compileall.compile_dir(package, quiet=1)
    psql = shutil.which("psql") or str(find_pg_bindir() / "psql")
    with TemporaryPostgres() as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE)
            conn.execute(
                "INSERT INTO big SELECT g, 'task ' || g, g %% 2 = 0, g %% 5, g * 1.25, now()"
                " FROM generate_series(1, %s) g", [args.rows]
            )
            conn.execute("VACUUM ANALYZE big")
        print(f"table: {args.rows:,} rows, chunks of {args.chunk_size:,}")
        results: dict[str, list[float]] = {"changefeed": [], "copy": []}
        peaks = []
        for number in range(args.rounds):
            order = ("copy", "changefeed") if number % 2 == 0 else ("changefeed", "copy")
            for kind in order:
                if kind == "copy":
                    argv = [psql, "-d", dsn, "-q", "-c", "COPY big TO STDOUT"]
                else:
                    argv = [sys.executable, "-m", "changefeed", "run", "big", "--url", dsn,
                            "--slot", f"snapshot_{number}", "--prefeed", "snapshot",
                            "--chunk-size", str(args.chunk_size), "--limit", str(args.rows),
                            "--quiet"]
                seconds, cpu, peak_kb = timed(argv)
                results[kind].append(seconds)
                if kind == "changefeed":
                    peaks.append(peak_kb)
                print(f"round {number + 1}: {kind:10} {seconds:6.2f} s"
                      f"  {args.rows / seconds:10,.0f} rows/s  (CPU {cpu:.2f} s)")
        best_cf, best_copy = min(results["changefeed"]), min(results["copy"])
        medians = statistics.median(results["copy"]) / statistics.median(results["changefeed"])
        print(f"\nbest of {args.rounds}: changefeed {args.rows / best_cf:,.0f} rows/s,"
              f" COPY {args.rows / best_copy:,.0f} rows/s")
        print(f"ratio changefeed / COPY: {best_copy / best_cf:.2f} (of the medians: {medians:.2f})")
        print(f"peak RSS of changefeed: {max(peaks) / 1024:.0f} MB")


if __name__ == "__main__":
    main()
