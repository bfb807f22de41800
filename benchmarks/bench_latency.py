"""Latency of `changefeed run`: from a transaction's commit to its line on stdout.

pgbench makes single-row commits at a fixed rate (``-R``) on a throwaway local cluster while
``changefeed run --format change`` streams them; a thread reads its stdout (noting only when
each chunk came: it shares the cores) and, once the round is over, subtracts each change's
``committed_at`` (PostgreSQL's commit timestamp, same machine, same clock) from the time its
line was read. Prints p50, p99 and the maximum, per implementation
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
``--feed-args`` adds options to ``changefeed run``, e.g. a pipeline in processes: ``--feed-args
"--where 'id >= 0' --sink /dev/stdout --processes"`` (the counts below are then the feed's
process alone, not its workers').

Each round also prints, per transaction of the load (counts, which a loaded machine does not
blur as it blurs times): the consumer's CPU while pgbench ran (start-up left out) and its
context switches (voluntary: it waited; involuntary: it lost its CPU), from /proc. ``--syscalls``
adds its system calls per transaction, counted while pgbench runs by ``perf trace -s`` (cheap)
or, where perf may not, ``strace -c -f`` (which slows every call: the latencies of those rounds
then mean nothing).

    .venv/bin/python benchmarks/bench_latency.py [--rate 10000] [--seconds 10] [--rounds 2]
        [--implementations c,python] [--trace] [--pin] [--nice N] [--syscalls] [--together]
        [--feed-args "OPTIONS"]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
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


class Reader:
    """Reads a consumer's stdout while it runs, doing as little as it can there (one
    ``os.read`` per wake-up, each chunk kept with the time it came; it shares the 2 cores with
    the consumer and the server), and counts the records that came (``marker``: what ends one).
    `latencies` parses them afterwards: (commit time, time read) per change."""

    def __init__(self, stream: object, marker: bytes) -> None:
        self.fd = stream.fileno()  # type: ignore[attr-defined]
        self.marker = marker
        self.chunks: list[tuple[float, bytes]] = []
        self.records = 0

    def run(self) -> None:
        tail = b""  # a marker cut by the end of a chunk
        keep = len(self.marker) - 1
        while chunk := os.read(self.fd, 1 << 20):  # to the end: a full pipe blocks the feed
            self.chunks.append((time.time(), chunk))
            data = tail + chunk
            self.records += data.count(self.marker)
            tail = data[-keep:] if keep else b""

    def lines(self) -> list[tuple[float, bytes]]:
        """Each whole line with the time its end was read."""
        result, partial = [], b""
        for read, chunk in self.chunks:
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            result.extend((read, line) for line in lines)
        return result

    def latencies(self, expected: int) -> list[tuple[float, float]]:
        """(commit time, time read) of the first ``expected`` changes: changefeed's insert
        lines (``--format change``)."""
        out = []
        for read, line in self.lines():
            change = orjson.loads(line)
            if change.get("operation") == "insert":
                out.append((datetime.fromisoformat(change["committed_at"]).timestamp(), read))
        return out[:expected]


class ReferenceReader(Reader):
    """The same for test_decoding's ``COMMIT 123 (at <time>)`` lines (pg_recvlogical)."""

    def latencies(self, expected: int) -> list[tuple[float, float]]:
        out = []
        for read, line in self.lines():
            if line.startswith(b"COMMIT"):
                at = line[line.index(b"(at ") + 4:].rstrip(b")").decode()
                out.append((datetime.fromisoformat(at).timestamp(), read))
        return out[:expected]


@dataclass
class Counters:
    """A process's CPU seconds and context switches so far (all its threads), from /proc."""

    cpu: float
    voluntary: int
    involuntary: int

    @classmethod
    def of(cls, pid: int) -> Counters:
        ticks = os.sysconf("SC_CLK_TCK")
        cpu, voluntary, involuntary = 0.0, 0, 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
                status = (task / "status").read_text()
            except OSError:  # a thread that just ended
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            voluntary += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])
            involuntary += int(
                re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])
        return cls(cpu, voluntary, involuntary)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.cpu - other.cpu, self.voluntary - other.voluntary,
                        self.involuntary - other.involuntary)


@dataclass
class Load:
    """What the consumer spent while pgbench ran: `Counters`, its system calls (``--syscalls``,
    name -> (calls, errors)) and the transactions pgbench made."""

    transactions: int = 0
    counters: Counters | None = None
    syscalls: dict[str, tuple[int, int]] | None = None

    def describe(self) -> str:
        if not self.transactions or self.counters is None:
            return ""
        per = 1 / self.transactions
        counters = self.counters
        text = (f"  per transaction: CPU {counters.cpu * per * 1e6:5.1f} us, context switches"
                f" {counters.voluntary * per:.2f} voluntary + {counters.involuntary * per:.2f}")
        if counters.voluntary:  # each a wait for the socket (or the pipe): a wake-up
            text += f"; CPU per wake-up {counters.cpu / counters.voluntary * 1e6:5.1f} us"
        if self.syscalls:
            calls = sorted(self.syscalls.items(), key=lambda item: -item[1][0])
            total = sum(count for count, _ in self.syscalls.values())
            text += f"\n  system calls per transaction: {total * per:.2f} (" + ", ".join(
                f"{name} {count * per:.2f}" + (f" ({errors * per:.2f} failed)" if errors else "")
                for name, (count, errors) in calls if count * per >= 0.005) + ")"
        return text


def attach_syscall_counter(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """Count the system calls of ``pid`` (all its threads) into ``output`` until SIGINT, once
    attached: ``perf trace -s`` where perf may (cheap: tracepoints), else ``strace -c -f``
    (ptrace: every call stops the process)."""
    if shutil.which("perf") and subprocess.run(
            ["perf", "trace", "-s", "--", "true"], capture_output=True).returncode == 0:
        counter = subprocess.Popen(["perf", "trace", "-s", "-o", str(output), "-p", str(pid)],
                                   stderr=subprocess.DEVNULL)

        def attached() -> bool:  # it opened its events
            for fd in Path(f"/proc/{counter.pid}/fd").iterdir():
                try:
                    if "perf_event" in os.readlink(fd):
                        return True
                except OSError:  # closed meanwhile
                    continue
            return False
    else:
        counter = subprocess.Popen(["strace", "-c", "-f", "-qq", "-o", str(output), "-p",
                                    str(pid)], stderr=subprocess.DEVNULL)

        def attached() -> bool:
            return "TracerPid:\t0\n" not in Path(f"/proc/{pid}/status").read_text()
    deadline = time.monotonic() + 10
    while not attached():
        if counter.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("could not count system calls (perf trace or strace; ptrace?)")
        time.sleep(0.01)
    return counter


def syscall_counts(output: Path) -> dict[str, tuple[int, int]]:
    """name -> (calls, errors) from ``perf trace -s``'s summary (summed over threads) or
    ``strace -c``'s table."""
    counts: dict[str, tuple[int, int]] = {}
    text = output.read_text()
    perf = "Summary of events" in text
    for line in text.splitlines():
        parts = line.split()
        if perf:  # syscall calls errors total min avg max stddev%
            if len(parts) != 8 or not parts[1].isdigit():
                continue
            name, calls, errors = parts[0], int(parts[1]), int(parts[2])
        else:  # % seconds usecs/call calls [errors] syscall
            if len(parts) not in (5, 6) or not parts[0][0].isdigit() or parts[-1] == "total":
                continue
            name, calls = parts[-1], int(parts[3])
            errors = int(parts[4]) if len(parts) == 6 else 0
        before = counts.get(name, (0, 0))
        counts[name] = (before[0] + calls, before[1] + errors)
    return counts


@dataclass
class Setup:
    """How a round runs its processes (see the module: ``--trace``, ``--pin``, ``--nice``,
    ``--syscalls``)."""

    trace: bool = False
    pin: bool = False
    nice: int | None = None
    syscalls: bool = False
    feed_args: tuple[str, ...] = ()
    """More options of ``changefeed run`` (``--feed-args``)."""

    def feed_argv(self, argv: list[str]) -> list[str]:
        if self.nice is not None:
            argv = ["nice", "-n", str(self.nice), *argv]
        return ["taskset", "-c", "1", *argv] if self.pin else argv

    def load_argv(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", "0", *argv] if self.pin else argv


class Consumer:
    """One consumer of a round (`pg_recvlogical` or ``changefeed run``) on a slot of its own:
    its process, the thread reading its stdout, and what it spent while pgbench ran."""

    def __init__(self, dsn: str, implementation: str, number: int, setup: Setup) -> None:
        self.dsn, self.implementation, self.setup = dsn, implementation, setup
        self.slot = f"latency_{re.sub(r'[^a-z0-9_]', '_', implementation.lower())}_{number}"
        self.trace: Path | None = None
        self.load = Load()
        self.tracer: subprocess.Popen[bytes] | None = None
        self.syscalls_output = Path(tempfile.mkdtemp()) / "syscalls.txt"
        self.cpu = 0.0
        reader_class: type[Reader] = Reader
        checkout = ""
        if implementation == "pg_recvlogical":
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')",
                             [self.slot])
            binary = shutil.which("pg_recvlogical") or str(find_pg_bindir() / "pg_recvlogical")
            argv = [binary, "-d", dsn, "--slot", self.slot, "--start", "-f", "-", "-F", "0",
                    "-o", "include-timestamp=1", "-o", "skip-empty-xacts=1"]
            env = dict(os.environ)
            reader_class = ReferenceReader
        else:
            # "c@DIR": the checkout in DIR (its .venv), for A/B rounds against another version.
            implementation, _, checkout = implementation.partition("@")
            python = str(Path(checkout) / ".venv/bin/python") if checkout else sys.executable
            argv = [python, "-m", "changefeed", "run", "latency", "--url", dsn, "--slot",
                    self.slot, "--format", "change", "--quiet", *setup.feed_args]
            env = {**os.environ, "CHANGEFEED_IMPL": implementation}
            if setup.trace:
                self.trace = Path(tempfile.mkdtemp()) / "trace.jsonl"
                env["CHANGEFEED_LATENCY_TRACE"] = str(self.trace)
        # In the checkout's own directory: ``-m`` imports from the working directory first.
        self.process = subprocess.Popen(setup.feed_argv(argv), stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env,
                                        cwd=checkout or None)
        self.reading = reader_class(self.process.stdout, b"COMMIT " if reader_class is
                                    ReferenceReader else b"\n")
        self.reader = threading.Thread(target=self.reading.run, daemon=True)
        self.started: Counters | None = None

    def streaming(self) -> bool:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return bool(conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s"
                                     " AND active", [self.slot]).fetchone())

    def begin(self) -> None:
        """Read its output; count from now on."""
        self.reader.start()
        if self.setup.pin:
            os.sched_setaffinity(self.reader.native_id or 0, {1})
        if self.setup.syscalls:
            self.tracer = attach_syscall_counter(self.process.pid, self.syscalls_output)
        self.started = Counters.of(self.process.pid)

    def end(self, transactions: int) -> None:
        """Stop counting (pgbench made ``transactions``)."""
        self.load.transactions = transactions
        assert self.started is not None
        self.load.counters = Counters.of(self.process.pid) - self.started
        if self.tracer is not None:
            self.tracer.send_signal(signal.SIGINT)  # detaches and writes its summary
            self.tracer.wait(timeout=30)
            self.load.syscalls = syscall_counts(self.syscalls_output)

    def stop(self) -> None:
        if self.tracer is not None and self.tracer.poll() is None:
            self.tracer.kill()
        self.syscalls_output.unlink(missing_ok=True)
        self.syscalls_output.parent.rmdir()
        if self.process.returncode is None:
            self.cpu = Counters.of(self.process.pid).cpu  # all of it, start-up too
            self.process.terminate()
            self.process.wait(timeout=30)  # a traced feed writes its trace as it stops
        if self.reader.is_alive():
            self.reader.join(timeout=30)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [self.slot])
            conn.execute("DROP PUBLICATION IF EXISTS " + self.slot)


def one_round(dsn: str, implementations: list[str], rate: int, seconds: int, number: int,
              setup: Setup) -> list[tuple[list[tuple[float, float]], Path | None, float, Load]]:
    """For each of ``implementations``, all consuming the same load at once: (commit time,
    time read) of each change of a round, the feed's trace file, the CPU seconds the feed
    (or the reference) used, and what it spent while pgbench ran."""
    consumers: list[Consumer] = []
    results = []
    try:
        for implementation in implementations:
            consumers.append(Consumer(dsn, implementation, number, setup))
        deadline = time.monotonic() + 30
        while not all(consumer.streaming() for consumer in consumers):
            if time.monotonic() > deadline:
                raise SystemExit("a consumer did not start streaming")
            time.sleep(0.1)
        expected = rate * seconds
        for consumer in consumers:
            consumer.begin()
        pgbench = shutil.which("pgbench") or str(find_pg_bindir() / "pgbench")
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write("INSERT INTO latency (note) VALUES ('x');\n")
            script.flush()
            # Commits flush the WAL (the throwaway cluster runs with synchronous_commit off,
            # which leaves a commit to the WAL writer, up to 200 ms later, for the walsender).
            done = subprocess.run(setup.load_argv([pgbench, "-n", "-f", script.name, "-R",
                                  str(rate), "-T", str(seconds), "-c", "2", "-j", "1", dsn]),
                                  check=True, capture_output=True,
                                  env={**os.environ, "PGOPTIONS": "-c synchronous_commit=on"})
        made = re.search(rb"actually processed: (\d+)", done.stdout)
        transactions = int(made[1]) if made else 0
        for consumer in consumers:  # the last lines come; then the counts end
            deadline = time.monotonic() + 10
            while (consumer.reading.records < min(expected, transactions)
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            consumer.end(transactions)
        time.sleep(0.2)  # what a feed writes after the last change (nothing, normally)
        for consumer in consumers:
            consumer.stop()
            results.append((consumer.reading.latencies(expected), consumer.trace,
                            consumer.cpu, consumer.load))
    finally:
        for consumer in consumers:
            if consumer.process.returncode is None:
                consumer.process.kill()
    return results


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
                        help="CHANGEFEED_IMPL values to run, each round after the reference;"
                        " IMPL@DIR runs the checkout in DIR (its .venv) instead of this one")
    parser.add_argument("--trace", action="store_true",
                        help="split changefeed's latency per change (see above)")
    parser.add_argument("--pin", action="store_true",
                        help="server and pgbench on CPU 0, the feed and the reader on CPU 1")
    parser.add_argument("--nice", type=int, help="run the feed and the reference at this nice")
    parser.add_argument("--syscalls", action="store_true",
                        help="count system calls per transaction (perf trace, or strace: then"
                        " the latencies mean nothing)")
    parser.add_argument("--together", action="store_true",
                        help="all consumers on the same load at once (a slot each): their"
                        " counts per transaction compare under the same conditions")
    parser.add_argument("--feed-args", default="", metavar="OPTIONS",
                        help="more options of changefeed run, as one shell-quoted string (e.g."
                        " \"--where 'id >= 0' --sink /dev/stdout --processes\")")
    args = parser.parse_args()
    setup = Setup(trace=args.trace, pin=args.pin, nice=args.nice, syscalls=args.syscalls,
                  feed_args=tuple(shlex.split(args.feed_args)))
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
            order = implementations if number % 2 == 0 else implementations[::-1]
            if args.together:  # one load for all: the same conditions, compared as counts
                rounds = [["pg_recvlogical", *order]]
            else:
                rounds = [["pg_recvlogical"]] + [[implementation] for implementation in order]
            reference = None
            for names in rounds:
                results = one_round(dsn, names, args.rate, args.seconds, number, setup)
                for name, (pairs, trace, cpu, load) in zip(names, results, strict=True):
                    label = name if name == "pg_recvlogical" else f"changefeed {name}"
                    p99 = report(label, milliseconds(pairs), args.seconds, reference, cpu)
                    if name == "pg_recvlogical":
                        reference = p99
                    print(load.describe())
                    if trace is not None and trace.exists():
                        report_trace(pairs, trace)


if __name__ == "__main__":
    main()
