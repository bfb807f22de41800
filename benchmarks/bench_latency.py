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

``--trace`` splits changefeed's latency per change (``CHANGEFEED_LATENCY_TRACE``, see
`changefeed.backends.postgres.tracing`): commit -> the walsender's send time (the server: WAL
flush, decoding, its wake-up), send -> the feed took the Commit frame (the socket, the feed's
wake-up and its queue), taken -> flushed (the feed's work), flushed -> read here (the pipe and this
reader); for the slowest 1% the mean of each part, and the feed's garbage collections.
``--pin`` puts the server's new backends (the walsender too) and pgbench on CPU 0, the feed (or
pg_recvlogical) and this reader on CPU 1; ``--nice N`` runs the feed and the reference at nice N.

    .venv/bin/python benchmarks/bench_latency.py [--rate 10000] [--seconds 10] [--rounds 2]
        [--implementations c,python] [--trace] [--pin] [--nice N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
import psycopg

from changefeed.embedded import TemporaryPostgres, find_pg_bindir

TABLE = "CREATE TABLE latency (id bigserial PRIMARY KEY, note text NOT NULL)"


def read_latencies(stream: object, out: list[tuple[float, float]], expected: int) -> None:
    """(commit time, time read) of each change line read from ``stream``, until ``expected``."""
    for line in stream:  # type: ignore[attr-defined]
        now = time.time()
        change = orjson.loads(line)
        if change.get("operation") != "insert":
            continue
        committed = datetime.fromisoformat(change["committed_at"]).timestamp()
        if len(out) < expected:  # then read on to the end: a full pipe would block the feed
            out.append((committed, now))


def read_reference_latencies(stream: object, out: list[tuple[float, float]],
                             expected: int) -> None:
    """The same as `read_latencies` for test_decoding's ``COMMIT 123 (at <time>)`` lines."""
    for line in stream:  # type: ignore[attr-defined]
        now = time.time()
        if not line.startswith(b"COMMIT"):
            continue
        committed = datetime.fromisoformat(line[line.index(b"(at ") + 4:].rstrip(b")\n")
                                           .decode()).timestamp()
        if len(out) < expected:
            out.append((committed, now))


@dataclass
class Setup:
    """How a round runs its processes (see the module: ``--trace``, ``--pin``, ``--nice``)."""

    trace: bool = False
    pin: bool = False
    nice: int | None = None

    def feed_argv(self, argv: list[str]) -> list[str]:
        if self.nice is not None:
            argv = ["nice", "-n", str(self.nice), *argv]
        return ["taskset", "-c", "1", *argv] if self.pin else argv

    def load_argv(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", "0", *argv] if self.pin else argv


def one_round(dsn: str, implementation: str, rate: int, seconds: int, number: int,
              setup: Setup) -> tuple[list[tuple[float, float]], Path | None, float]:
    """(commit time, time read) of each change of a round, the feed's trace file, and the CPU
    seconds the feed (or the reference) used."""
    slot = f"latency_{implementation}_{number}"
    trace: Path | None = None
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
        if setup.trace:
            trace = Path(tempfile.mkdtemp()) / "trace.jsonl"
            env["CHANGEFEED_LATENCY_TRACE"] = str(trace)
    feed = subprocess.Popen(setup.feed_argv(argv), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    latencies: list[tuple[float, float]] = []
    before = None
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
        if setup.pin:
            os.sched_setaffinity(reader.native_id or 0, {1})
        pgbench = shutil.which("pgbench") or str(find_pg_bindir() / "pgbench")
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write("INSERT INTO latency (note) VALUES ('x');\n")
            script.flush()
            # Commits flush the WAL (the throwaway cluster runs with synchronous_commit off,
            # which leaves a commit to the WAL writer, up to 200 ms later, for the walsender).
            subprocess.run(setup.load_argv([pgbench, "-n", "-f", script.name, "-R", str(rate), "-T",
                            str(seconds), "-c", "2", "-j", "1", dsn]),
                           check=True, capture_output=True,
                           env={**os.environ, "PGOPTIONS": "-c synchronous_commit=on"})
        before = resource.getrusage(resource.RUSAGE_CHILDREN)  # pgbench's counted already
        time.sleep(1.0)  # the last lines come; then the feed stops and its stdout ends
        feed.terminate()
        reader.join(timeout=30)
    finally:
        feed.terminate()
        feed.wait(timeout=30)  # a traced feed writes its trace as it stops
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the feed's added, once reaped
        cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
               if before is not None else 0.0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            conn.execute("DROP PUBLICATION IF EXISTS " + slot)
    return latencies, trace, cpu


def milliseconds(pairs: list[tuple[float, float]]) -> list[float]:
    return [(read - committed) * 1000 for committed, read in pairs]


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def report(name: str, latencies: list[float], seconds: int, reference: float | None,
           cpu: float) -> float:
    """Print a round's numbers; returns its p99 (0 without changes)."""
    if not latencies:
        print(f"{name:14} no changes read")
        return 0.0
    ordered = sorted(latencies)
    p99 = percentile(ordered, 0.99)
    ratio = f"  p99 {p99 / reference:5.2f}x pg_recvlogical's" if reference else ""
    print(f"{name:14} {len(ordered):7,} changes ({len(ordered) / seconds:,.0f}/s):"
          f" p50 {statistics.median(ordered):6.2f} ms  p90 {percentile(ordered, 0.9):6.2f} ms"
          f"  p99 {p99:7.2f} ms  max {ordered[-1]:7.2f} ms{ratio}  CPU {cpu:.2f} s", flush=True)
    return p99


def report_trace(pairs: list[tuple[float, float]], trace: Path) -> None:
    """Where each change's latency went (see the module), joined with what this reader saw by
    commit time; the slowest 1% by the whole latency, and the feed's garbage collections."""
    read_here = {round(committed * 1e6): read for committed, read in pairs}
    parts: list[tuple[float, float, float, float]] = []
    collections, stalls, flushes = [], [], []
    for line in trace.read_bytes().splitlines():
        row = orjson.loads(line)
        if "gc" in row:
            collections.append(row)
            continue
        if "quiet_work" in row:
            stalls.append(row["ms"])
            continue
        if "flush" in row:
            flushes.append(row["ms"])
            continue
        read = read_here.get(round(row["commit"] * 1e6))
        if read is None or not row["sent"]:
            continue
        parts.append(((row["sent"] - row["commit"]) * 1000, (row["read"] - row["sent"]) * 1000,
                      (row["flushed"] - row["read"]) * 1000, (read - row["flushed"]) * 1000))
    trace.unlink()
    trace.parent.rmdir()
    if not parts:
        print("  trace: nothing to join")
        return
    names = ("server (commit->sent)", "to feed (sent->taken)", "feed (taken->flushed)",
             "pipe+reader (flushed->read)")
    slowest = sorted(parts, key=sum)[int(len(parts) * 0.99):]
    for index, name in enumerate(names):
        ordered = sorted(part[index] for part in parts)
        print(f"  {name:28} p50 {percentile(ordered, 0.5):7.2f}"
              f"  p90 {percentile(ordered, 0.9):7.2f}"
              f"  p99 {percentile(ordered, 0.99):7.2f} ms;  slowest 1%:"
              f" {statistics.mean(part[index] for part in slowest):7.2f} ms on average")
    for generation in (0, 1, 2):
        pauses = sorted(row["ms"] for row in collections if row["gc"] == generation)
        if pauses:
            print(f"  feed's generation {generation} collections: {len(pauses)}, median"
                  f" {statistics.median(pauses):.2f} ms, longest {pauses[-1]:.2f} ms")
    if stalls:
        print(f"  feed's work while quiet took >= 1 ms {len(stalls)} times, longest"
              f" {max(stalls):.2f} ms")
    if flushes:
        print(f"  feed's flushes took >= 1 ms {len(flushes)} times, longest {max(flushes):.2f} ms,"
              f" {sum(flushes):.0f} ms in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000, help="commits per second")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--implementations", default="c,python",
                        help="CHANGEFEED_IMPL values to run, each round after the reference")
    parser.add_argument("--trace", action="store_true",
                        help="split changefeed's latency per change (see above)")
    parser.add_argument("--pin", action="store_true",
                        help="server and pgbench on CPU 0, the feed and the reader on CPU 1")
    parser.add_argument("--nice", type=int, help="run the feed and the reference at this nice")
    args = parser.parse_args()
    setup = Setup(trace=args.trace, pin=args.pin, nice=args.nice)
    os.chdir(Path(__file__).resolve().parent.parent)
    with TemporaryPostgres() as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE)
        if args.pin:  # the backends forked from now on (the walsender too) inherit it
            postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
            os.sched_setaffinity(postmaster, {0})
        print(f"single-row commits at {args.rate:,}/s for {args.seconds} s, commit -> stdout:")
        implementations = args.implementations.split(",")
        for number in range(args.rounds):
            print(f"round {number + 1}: {os.getloadavg()[0]:.2f} load", flush=True)
            pairs, _, cpu = one_round(dsn, "pg_recvlogical", args.rate, args.seconds, number,
                                      setup)
            reference = report("pg_recvlogical", milliseconds(pairs), args.seconds, None, cpu)
            for implementation in (implementations if number % 2 == 0
                                   else implementations[::-1]):
                pairs, trace, cpu = one_round(dsn, implementation, args.rate, args.seconds,
                                              number, setup)
                report(f"changefeed {implementation}", milliseconds(pairs), args.seconds,
                       reference, cpu)
                if trace is not None and trace.exists():
                    report_trace(pairs, trace)


if __name__ == "__main__":
    main()
