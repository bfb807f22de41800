"""What pgoutput's ``binary`` mode (PostgreSQL 14+) costs the server, against text mode.

The same workload is read by ``pg_recvlogical`` (no decoding at all: what it measures is the
walsender's work) from fresh copies of one slot, with ``-o binary=true`` and without, in
alternating rounds; the walsender's CPU time (from /proc, sampled until it exits) and the bytes
sent are compared per row shape:

    narrow      int key, short text
    bench       bench_postgres.py's rows: int, text, bool, int, numeric(12,2), timestamptz
    temporal    timestamptz, timestamp, date, time, interval
    numeric     numeric, float8, float4, bigint
    text        text of 1 kB, varchar, bytea of 1 kB

CPU time is the process's own, so a loaded machine moves it far less than wall time. The
second column, binary/text, is the ratio this run measured: the verdict is kept as text mode
(README, "pgoutput binary mode") because the walsender's CPU does not move (its cost is
decoding the WAL, not the output functions) and the client's compiled text parsers of the
common types are a small part of a row's cost.

    .venv/bin/python benchmarks/bench_binary.py [--rows 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from changefeed.embedded import TemporaryPostgres, find_pg_bindir

SHAPES = {
    "narrow": ("id int PRIMARY KEY, title text",
               "SELECT g, 'task ' || g FROM generate_series(1, %s) g"),
    "bench": ("id int PRIMARY KEY, title text, done bool, priority int, amount numeric(12, 2),"
              " created_at timestamptz",
              "SELECT g, 'task ' || g, g %% 2 = 0, g %% 5, g * 1.25, now() - g * interval '1 s'"
              " FROM generate_series(1, %s) g"),
    "temporal": ("id int PRIMARY KEY, a timestamptz, b timestamp, c date, d time, e interval",
                 "SELECT g, now() - g * interval '1 min', localtimestamp - g * interval '1 s',"
                 " current_date - g %% 1000, localtime, g * interval '1 s'"
                 " FROM generate_series(1, %s) g"),
    "numeric": ("id int PRIMARY KEY, a numeric, b float8, c float4, d bigint",
                "SELECT g, g / 7.0, g / 3.0, g / 9.0, g::bigint * 1000003"
                " FROM generate_series(1, %s) g"),
    "text": ("id int PRIMARY KEY, a text, b varchar(40), c bytea",
             "SELECT g, repeat(md5(g::text), 32), 'v' || g, decode(repeat(md5(g::text), 32),"
             " 'hex') FROM generate_series(1, %s) g"),
}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_read(dsn: str, slot: str, end_lsn: str, binary: bool) -> tuple[float, float, int]:
    """pg_recvlogical reads ``slot`` to ``end_lsn``: (its seconds, the walsender's CPU seconds,
    bytes written)."""
    binary_path = shutil.which("pg_recvlogical") or str(find_pg_bindir() / "pg_recvlogical")
    out = Path(f"/tmp/bench_binary_{os.getpid()}.out")
    argv = [binary_path, "-d", dsn, "--slot", slot, "--start", "--no-loop", "-E", end_lsn,
            "-o", "proto_version=1", "-o", "publication_names=bench", "-f", str(out)]
    if binary:
        argv += ["-o", "binary=true"]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stderr=subprocess.PIPE)
    walsender, cpu = None, 0.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        while process.poll() is None:
            if walsender is None:
                row = conn.execute("SELECT active_pid FROM pg_replication_slots"
                                   " WHERE slot_name = %s", [slot]).fetchone()
                walsender = row[0] if row else None
            if walsender is not None:
                sample = cpu_seconds(walsender)
                cpu = sample if sample is not None else cpu
            time.sleep(0.005)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"pg_recvlogical failed: {process.stderr.read().decode()}")
    size = out.stat().st_size
    out.unlink()
    return seconds, cpu, size


def measure(server: TemporaryPostgres, shape: str, rows: int, rounds: int) -> None:
    dsn = server.dsn()
    columns, select = SHAPES[shape]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench")
        conn.execute("DROP PUBLICATION IF EXISTS bench")
        conn.execute(f"CREATE TABLE bench ({columns})")
        conn.execute("CREATE PUBLICATION bench FOR TABLE bench")
        conn.execute("SELECT pg_create_logical_replication_slot('template', 'pgoutput')")
        for start in range(0, rows, 1000):  # 1,000 rows per transaction
            conn.execute(f"INSERT INTO bench {select.replace('1, %s', '%s::int, %s::int')}",
                         [start + 1, min(start + 1000, rows)])
        (end_lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for number in range(rounds):
        for binary in ((False, True) if number % 2 == 0 else (True, False)):
            slot = f"read_{number}_{int(binary)}"
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_copy_logical_replication_slot('template', %s)", [slot])
            results[binary].append(one_read(dsn, slot, end_lsn, binary))
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot('template')")
    text_cpu = statistics.median(r[1] for r in results[False])
    binary_cpu = statistics.median(r[1] for r in results[True])
    print(f"{shape:9} walsender CPU per row: text {text_cpu / rows * 1e6:5.2f} us,"
          f" binary {binary_cpu / rows * 1e6:5.2f} us ({binary_cpu / text_cpu:4.2f}x);"
          f" bytes per row: text {results[False][0][2] / rows:6.1f},"
          f" binary {results[True][0][2] / rows:6.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    with TemporaryPostgres() as server:
        version = server_version(server.dsn())
        if version < 140000:
            raise SystemExit(f"binary mode needs PostgreSQL 14+, this is {version}")
        print(f"{args.rows:,} rows per shape, medians of {args.rounds} rounds (load average"
              f" {os.getloadavg()[0]:.1f}):")
        for shape in args.shapes.split(","):
            measure(server, shape, args.rows, args.rounds)


def server_version(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.info.server_version


if __name__ == "__main__":
    sys.exit(main())
