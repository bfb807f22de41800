"""Snapshot throughput of `changefeed run --prefeed snapshot` against COPY of the same table.

A table of 1,000,000 rows on a throwaway local cluster. Two references, through psql into
/dev/null: ``COPY big TO STDOUT`` is the limit (the server formats the rows in table order,
nothing decodes them); the chunk queries, ``COPY (SELECT ... WHERE key > ... ORDER BY key LIMIT
n) TO STDOUT`` one after the other exactly as the feed sends them, are the server's own cost of
reading the table in key order, in chunks. changefeed reads those chunks between watermarks
(see `changefeed.backends.postgres.backfill`) through COPY and writes JSON lines to /dev/null.
Its start-up (interpreter, imports, the slot, the first chunk: the same run with ``--limit 1``)
is measured too, and set apart in a second ratio, the rate of the reads themselves. All run as
child processes, timed from start to exit, in alternating order; the best and the
median rounds are compared. The peak RSS of changefeed shows that a snapshot holds one chunk,
not the table. ``--reference`` runs another checkout's changefeed (its venv's python, e.g.
main's) in the same rounds, to compare two versions under the same load.

    .venv/bin/python benchmarks/bench_snapshot.py [--rows 1000000] [--rounds 3]
        [--reference ../main/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_postgres import compile_checkouts, timed  # noqa: E402  (a script beside this one)

from changefeed._speedups import implementation  # noqa: E402
from changefeed.backends.postgres.backfill import CHUNK_BYTES, DEFAULT_CHUNK_ROWS  # noqa: E402
from changefeed.backends.postgres.backfill_reads import read_chunk  # noqa: E402
from changefeed.backends.postgres.chunks import TableBackfill  # noqa: E402
from changefeed.backends.postgres.copy import PROBE_ROWS, CopyReader, limit_for  # noqa: E402
from changefeed.backends.postgres.tables import stream_columns  # noqa: E402
from changefeed.embedded import TemporaryPostgres, find_pg_bindir  # noqa: E402

TABLE = """CREATE TABLE big (
    id int PRIMARY KEY, title text NOT NULL, done boolean NOT NULL, priority int,
    amount numeric(12, 2), created_at timestamptz NOT NULL)"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="rows per chunk (default: the feed's, by the memory budget)")
    parser.add_argument("--reference", metavar="PYTHON", default=None,
                        help="another checkout's venv python: its changefeed runs as well")
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    compile_checkouts(args.reference)
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
            chunks = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_snapshot_{os.getpid()}.sql"
            size = chunk_rows(conn, args.chunk_size)
            chunks.write_text(chunk_script(conn, args.rows, size))
        print(f"table: {args.rows:,} rows, chunks of {size:,} rows"
              f" ({'--chunk-size' if args.chunk_size else 'by the feed memory budget'})")
        kinds: tuple[str, ...] = ("copy", "chunks", "changefeed", "start-up")
        if args.reference:
            kinds += ("reference",)
        results: dict[str, list[float]] = {kind: [] for kind in kinds}
        peaks: dict[str, list[int]] = {"changefeed": [], "reference": []}
        for number in range(args.rounds):
            order = kinds if number % 2 == 0 else kinds[::-1]
            for kind in order:
                if kind == "copy":
                    argv = [psql, "-d", dsn, "-q", "-c", "COPY big TO STDOUT"]
                elif kind == "chunks":
                    argv = [psql, "-d", dsn, "-q", "-f", str(chunks)]
                elif kind == "start-up":  # the same run to its first row: no snapshot's reads
                    argv = [sys.executable, "-P", "-m", "changefeed", "run", "big", "--url",
                            dsn, "--slot", f"startup_{number}", "--prefeed", "snapshot",
                            "--limit", "1", "--quiet"]
                else:
                    # -P: the package that python's venv installs, not the one in this folder
                    python = sys.executable if kind == "changefeed" else args.reference
                    argv = [python, "-P", "-m", "changefeed", "run", "big", "--url", dsn,
                            "--slot", f"{kind}_{number}", "--prefeed", "snapshot",
                            "--limit", str(args.rows), "--quiet"]
                    if args.chunk_size:
                        argv += ["--chunk-size", str(args.chunk_size)]
                seconds, cpu, peak_kb = timed(argv)
                results[kind].append(seconds)
                if kind in peaks:
                    peaks[kind].append(peak_kb)
                rate = f"{args.rows / seconds:10,.0f} rows/s" if kind != "start-up" else " " * 17
                print(f"round {number + 1}: {kind:10} {seconds:6.2f} s  {rate}  (CPU {cpu:.2f} s)")
        chunks.unlink()
        median = {kind: statistics.median(results[kind]) for kind in kinds}
        best = {kind: min(results[kind]) for kind in kinds}
        rates = [kind for kind in kinds if kind != "start-up"]
        print(f"\nmedians of {args.rounds}: " + ", ".join(
            f"{kind} {args.rows / median[kind]:,.0f} rows/s" for kind in rates))
        print("best: " + ", ".join(f"{kind} {args.rows / best[kind]:,.0f} rows/s"
                                    for kind in rates))
        print(f"ratio changefeed / COPY: {median['copy'] / median['changefeed']:.2f} (medians),"
              f" {best['copy'] / best['changefeed']:.2f} (best)")
        print(f"ratio changefeed / chunk queries: {median['chunks'] / median['changefeed']:.2f}"
              f" (medians); chunk queries / COPY: {median['copy'] / median['chunks']:.2f}")
        # What start-up costs once (the interpreter, imports, connections, the slot, the first
        # chunk), set apart: the rate of the snapshot's reads themselves.
        reading = median["changefeed"] - median["start-up"]
        print(f"start-up (a run to its first row): {median['start-up']:.2f} s; changefeed's"
              f" reads after it: {args.rows / reading:,.0f} rows/s,"
              f" {median['copy'] / reading:.2f}x of COPY")
        if args.reference:
            print(f"ratio reference / COPY: {median['copy'] / median['reference']:.2f}"
                  f" (medians); changefeed / reference: "
                  f"{median['reference'] / median['changefeed']:.2f}")
        for kind, peak in peaks.items():
            if peak:
                print(f"peak RSS of {kind}: {max(peak) / 1024:.0f} MB")


def chunk_rows(conn: psycopg.Connection, chunk_size: int | None) -> int:
    """The rows of the feed's chunks of ``big`` after its first: ``chunk_size`` rows, fewer
    when they would hold more than the memory budget (as `read_chunk` measures the first)."""
    oid = conn.execute("SELECT 'big'::regclass::oid").fetchone()[0]
    backfill = TableBackfill(oid, "public.big", ["id"], ["integer"])
    size = chunk_size or DEFAULT_CHUNK_ROWS
    # As the feed reads it: as lines on the compiled path (a line holds less than a row).
    read_chunk(conn, backfill, CopyReader(), chunk_size=size, chunk_bytes=CHUNK_BYTES,
               lines=implementation == "c")
    return limit_for(size, CHUNK_BYTES, backfill.row_bytes)


def chunk_script(conn: psycopg.Connection, rows: int, size: int) -> str:
    """The COPY statements of the feed's chunk queries of ``big`` (ids 1 to ``rows``), as
    `TableBackfill.chunk_query` writes them, one after the other: a probe, then ``size`` rows
    each."""
    backfill = TableBackfill(0, "public.big", ["id"], ["integer"])
    columns = stream_columns(conn, conn.execute("SELECT 'big'::regclass::oid").fetchone()[0])
    statements = []
    # The feed's first chunk is a probe (the size of a row is not known yet).
    afters = [0, *range(min(size, PROBE_ROWS), rows + 1, size)]
    for after in afters:
        backfill.after = [str(after)] if after else None
        query = backfill.chunk_query(sql.Identifier("big"), columns, size)
        statements.append(sql.SQL("COPY ({}) TO STDOUT;").format(query).as_string(conn))
    return "\n".join(statements) + "\n"


if __name__ == "__main__":
    main()
