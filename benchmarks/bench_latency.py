"""Latency of `changefeed run`: from a transaction's commit to its line on stdout.

pgbench makes single-row commits at a fixed rate (``-R``) on a throwaway local cluster while
``changefeed run --format change`` streams them; a thread reads its stdout and, for each line,
subtracts the change's ``committed_at`` (PostgreSQL's commit timestamp, same machine, same
clock) from the time the line was read. Prints p50, p99 and the maximum, per implementation
(``CHANGEFEED_IMPL``: the pure-Python path and the compiled one, in alternating rounds), and
for the reference: ``pg_recvlogical`` with ``test_decoding`` (its COMMIT lines carry the commit
time), which writes each message as it comes, so its latency is the server's, the transport's
and the machine's share (CPU contention on 2 shared cores) and the difference is the client's.
Each round prints its p99 as a ratio of the reference's in the same round.

    .venv/bin/python benchmarks/bench_latency.py [--rate 10000] [--seconds 10] [--rounds 2]
        [--implementations c,python]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import orjson
import psycopg

from changefeed.embedded import TemporaryPostgres, find_pg_bindir

TABLE = "CREATE TABLE latency (id bigserial PRIMARY KEY, note text NOT NULL)"


def read_latencies(stream: object, out: list[float], expected: int) -> None:
    """Latency in milliseconds of each change line read from ``stream``, until ``expected``."""
    for line in stream:  # type: ignore[attr-defined]
        now = time.time()
        change = orjson.loads(line)
        if change.get("operation") != "insert":
            continue
        committed = datetime.fromisoformat(change["committed_at"]).timestamp()
        if len(out) < expected:  # then read on to the end: a full pipe would block the feed
            out.append((now - committed) * 1000)


def read_reference_latencies(stream: object, out: list[float], expected: int) -> None:
    """The same as `read_latencies` for test_decoding's ``COMMIT 123 (at <time>)`` lines."""
    for line in stream:  # type: ignore[attr-defined]
        now = time.time()
        if not line.startswith(b"COMMIT"):
            continue
        committed = datetime.fromisoformat(line[line.index(b"(at ") + 4:].rstrip(b")\n")
                                           .decode()).timestamp()
        if len(out) < expected:
            out.append((now - committed) * 1000)


def one_round(dsn: str, implementation: str, rate: int, seconds: int, number: int) -> list[float]:
    slot = f"latency_{implementation}_{number}"
    reader_of = read_latencies
    if implementation == "pg_recvlogical":
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [slot])
        binary = shutil.which("pg_recvlogical") or str(find_pg_bindir() / "pg_recvlogical")
        argv = [binary, "-d", dsn, "--slot", slot, "--start", "-f", "-", "-F", "0",
                "-o", "include-timestamp=1", "-o", "skip-empty-xacts=1"]
        env = dict(os.environ)
        reader_of = read_reference_latencies
    else:
        argv = [sys.executable, "-m", "changefeed", "run", "latency", "--url", dsn, "--slot",
                slot, "--format", "change", "--quiet"]
        env = {**os.environ, "CHANGEFEED_IMPL": implementation}
    feed = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    latencies: list[float] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:  # wait until the feed streams
            deadline = time.monotonic() + 30
            while not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s"
                                   " AND active", [slot]).fetchone():
                if time.monotonic() > deadline:
                    raise SystemExit("changefeed run did not start streaming")
                time.sleep(0.1)
        expected = rate * seconds
        reader = threading.Thread(target=reader_of, args=(feed.stdout, latencies, expected),
                                  daemon=True)
        reader.start()
        pgbench = shutil.which("pgbench") or str(find_pg_bindir() / "pgbench")
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write("INSERT INTO latency (note) VALUES ('x');\n")
            script.flush()
            # Commits flush the WAL (the throwaway cluster runs with synchronous_commit off,
            # which leaves a commit to the WAL writer, up to 200 ms later, for the walsender).
            subprocess.run([pgbench, "-n", "-f", script.name, "-R", str(rate), "-T",
                            str(seconds), "-c", "2", "-j", "1", dsn],
                           check=True, capture_output=True,
                           env={**os.environ, "PGOPTIONS": "-c synchronous_commit=on"})
        time.sleep(1.0)  # the last lines come; then the feed stops and its stdout ends
        feed.terminate()
        reader.join(timeout=30)
    finally:
        feed.terminate()
        feed.wait(timeout=30)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            conn.execute("DROP PUBLICATION IF EXISTS " + slot)
    return latencies


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def report(name: str, latencies: list[float], seconds: int, reference: float | None) -> float:
    """Print a round's numbers; returns its p99 (0 without changes)."""
    if not latencies:
        print(f"{name:14} no changes read")
        return 0.0
    ordered = sorted(latencies)
    p99 = percentile(ordered, 0.99)
    ratio = f"  p99 {p99 / reference:5.2f}x pg_recvlogical's" if reference else ""
    print(f"{name:14} {len(ordered):7,} changes ({len(ordered) / seconds:,.0f}/s):"
          f" p50 {statistics.median(ordered):6.2f} ms  p90 {percentile(ordered, 0.9):6.2f} ms"
          f"  p99 {p99:7.2f} ms  max {ordered[-1]:7.2f} ms{ratio}", flush=True)
    return p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000, help="commits per second")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--implementations", default="c,python",
                        help="CHANGEFEED_IMPL values to run, each round after the reference")
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    with TemporaryPostgres() as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE)
        print(f"single-row commits at {args.rate:,}/s for {args.seconds} s, commit -> stdout:")
        implementations = args.implementations.split(",")
        for number in range(args.rounds):
            reference = report("pg_recvlogical", one_round(
                dsn, "pg_recvlogical", args.rate, args.seconds, number), args.seconds, None)
            for implementation in (implementations if number % 2 == 0
                                   else implementations[::-1]):
                latencies = one_round(dsn, implementation, args.rate, args.seconds, number)
                report(f"changefeed {implementation}", latencies, args.seconds, reference)


if __name__ == "__main__":
    main()
