"""``changefeed serve``: each pipeline in a process of its own, or in a thread of the server?

Workload: ``--changes`` row changes (as in bench_postgres.py) read by ``--pipelines`` pipelines at
once, each from its own slot (a copy of one made before the workload), each writing JSON deltas
to /dev/null through the served pipeline's meters, until it has read every change. The same
worker code (`changefeed.serve.pipelines.worker.PipelineRun`) runs either

* **process**: one ``python -m changefeed.serve.pipelines.worker`` process per pipeline, as the
  server runs them (a probe thread in this process stands for the server's event loop), or
* **thread**: every pipeline in a thread of one process, with the probe thread beside them;

timed from start to the last pipeline's end, in alternating order over several rounds. For each:
wall time, changes/s, CPU seconds, peak RSS (summed over processes), and the probe's lateness
(how much later than asked a 10 ms sleep of another thread wakes up: what a health check or a
scrape would wait), p50 and p99. Then the meters' own cost: one pipeline through the worker
against ``changefeed run`` with the same sink and no meters (CPU per change).

    .venv/bin/python benchmarks/bench_serve.py [--changes 100000] [--pipelines 3] [--rounds 3]
        [--format delta|change|debezium]

CPU time on a shared machine varies by more than the meters cost, so ``--meter-cost plain`` and
``--meter-cost metered`` run N in-memory changes through the same pipeline without and with the
meters (no server, no other process), for counting instructions: run each under valgrind for
two sizes and subtract (what is left is per change):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python benchmarks/bench_serve.py --meter-cost metered --changes 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_postgres import TABLE, make_workload  # noqa: E402

from changefeed.embedded import TemporaryPostgres  # noqa: E402


def fresh_slots(dsn: str, count: int) -> list[str]:
    """``count`` copies of the slot made before the workload: each reads it all."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = [f"copy_{time.monotonic_ns()}_{number}" for number in range(count)]
        for name in names:
            conn.execute("SELECT pg_copy_logical_replication_slot('template', %s)", [name])
    return names


def drop_slots(dsn: str, names: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [name])


def spec(name: str, dsn: str, slot: str, limit: int, fmt: str = "delta") -> dict[str, Any]:
    """A served pipeline's spec (as `PipelineSpec.to_json` writes it)."""
    return {"name": name, "source": {"kind": "database"}, "secrets": [], "options": {
        "tables": ["bench"], "url": dsn, "ops": ["insert", "delete", "update"], "prefeed": None,
        "fmt": fmt, "model": None, "exclude": [], "chunk_size": None, "slot": slot,
        "publication": "bench", "checkpoint": None, "limit": limit, "idle_timeout": None,
        "where": None, "filter": None, "stages": [], "sink": "/dev/null", "dead_letter": None,
        "processes": False, "messages": [], "quiet": True}}


class Probe(threading.Thread):
    """Sleeps 10 ms over and over and records how late it wakes up (seconds)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.late: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            started = time.perf_counter()
            time.sleep(0.01)
            self.late.append(time.perf_counter() - started - 0.01)

    def summary(self) -> dict[str, float]:
        self.done.set()
        self.join()
        ordered = sorted(self.late) or [0.0]
        return {"p50_ms": 1000 * ordered[len(ordered) // 2],
                "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]}


def in_processes(specs: list[dict[str, Any]]) -> dict[str, float]:
    probe = Probe()
    probe.start()
    started = time.perf_counter()
    children = []
    for one in specs:
        read_fd, write_fd = os.pipe()
        child = subprocess.Popen(
            [sys.executable, "-m", "changefeed.serve.pipelines.worker", str(write_fd)],
            stdin=subprocess.PIPE, pass_fds=(write_fd,))
        os.close(write_fd)
        assert child.stdin is not None
        child.stdin.write(json.dumps({"spec": one, "quiet": True}).encode())
        child.stdin.close()
        drain = threading.Thread(target=lambda fd=read_fd: _drain(fd), daemon=True)
        drain.start()
        children.append(child)
    cpu = rss = 0.0
    for child in children:
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("a pipeline process failed")
        cpu += usage.ru_utime + usage.ru_stime
        rss += usage.ru_maxrss
    wall = time.perf_counter() - started
    return {"wall": wall, "cpu": cpu, "rss_mb": rss / 1024, **probe.summary()}


def _drain(fd: int) -> None:
    with os.fdopen(fd, "rb") as reports:
        for _ in reports:
            pass


def in_threads(specs: list[dict[str, Any]]) -> dict[str, float]:
    """Run in a child process of its own, so that its CPU and RSS are its own."""
    argv = [sys.executable, __file__, "--threads-child", json.dumps(specs)]
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    assert child.stdout is not None
    probe = json.loads(child.stdout.read())
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("the threads' process failed")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024, **probe}


def threads_child(specs: list[dict[str, Any]]) -> None:
    from changefeed.serve.pipelines.worker import PipelineRun, spec_of

    probe = Probe()
    probe.start()
    runs = [PipelineRun(spec_of(one), lambda message: None, quiet=True) for one in specs]
    threads = [threading.Thread(target=run.run) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(probe.summary()))


def meter_cost(kind: str, changes: int) -> None:
    """Deliver ``changes`` in-memory changes as deltas to /dev/null, with or without meters."""
    from datetime import datetime, timezone

    from changefeed.delivery import deliver
    from changefeed.pipelines import JsonLinesSink, Pipeline, to_delta
    from changefeed.serve.pipelines.meters import Labeling, MeasuredOutput, MeasuredSink, SinkMeter
    from changefeed.testing import MemoryFeed, insert

    now = datetime.now(timezone.utc)
    feed = MemoryFeed("public.bench", changes=[insert(
        "public.bench", {"id": i, "title": f"task {i}", "done": False, "priority": i % 5,
                         "amount": "12.50", "created_at": now}, committed_at=now)
        for i in range(changes)])
    sink = JsonLinesSink("/dev/null")
    if kind == "plain":
        output = Pipeline(feed, [to_delta()], sink=sink).output()
    else:
        output = MeasuredOutput(Pipeline(feed, [Labeling(to_delta())],
                                         sink=MeasuredSink(sink, SinkMeter())).output())
    assert deliver(feed, output).count == changes


def unmetered(dsn: str, slot: str, limit: int) -> float:
    """CPU seconds of ``changefeed run`` with the same sink and no meters."""
    argv = [sys.executable, "-m", "changefeed", "run", "bench", "--url", dsn, "--slot", slot,
            "--publication", "bench", "--limit", str(limit), "--sink", "/dev/null", "--quiet"]
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("changefeed run failed")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--pipelines", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", default="delta", choices=["delta", "change", "debezium"],
                        help="what the pipelines write (debezium costs the client most)")
    parser.add_argument("--threads-child", help=argparse.SUPPRESS)
    parser.add_argument("--meter-cost", choices=["plain", "metered"])
    args = parser.parse_args()
    if args.meter_cost:
        meter_cost(args.meter_cost, args.changes)
        return
    if args.threads_child:
        threads_child(json.loads(args.threads_child))
        return
    os.chdir(Path(__file__).resolve().parent.parent)
    with TemporaryPostgres() as server:
        dsn = server.dsn()
        modes = ("process", "thread")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE)
            conn.execute("CREATE PUBLICATION bench FOR TABLE bench")
            conn.execute("SELECT pg_create_logical_replication_slot('template', 'pgoutput')")
            make_workload(conn, args.changes)
            conn.execute("CHECKPOINT")
        print(f"workload: {args.changes:,} changes, read by {args.pipelines} pipelines at once"
              f" ({args.format})")
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for number in range(args.rounds):
            order = modes if number % 2 == 0 else tuple(reversed(modes))
            for mode in order:
                slots = fresh_slots(dsn, args.pipelines)
                specs = [spec(f"p{p}", dsn, slot, args.changes, args.format)
                         for p, slot in enumerate(slots)]
                run = in_processes if mode == "process" else in_threads
                result = run(specs)
                drop_slots(dsn, slots)
                results[mode].append(result)
                total = args.changes * args.pipelines
                print(f"round {number + 1}: {mode:8} {result['wall']:6.2f} s"
                      f" {total / result['wall']:9,.0f} changes/s  CPU {result['cpu']:6.2f} s"
                      f"  RSS {result['rss_mb']:5.0f} MB  probe late p50 {result['p50_ms']:.1f}"
                      f" ms, p99 {result['p99_ms']:.1f} ms")
        print()
        for mode in modes:
            rows = results[mode]
            print(f"median {mode:8} {statistics.median(r['wall'] for r in rows):6.2f} s,"
                  f" CPU {statistics.median(r['cpu'] for r in rows):.2f} s,"
                  f" RSS {statistics.median(r['rss_mb'] for r in rows):.0f} MB,"
                  f" probe p99 {statistics.median(r['p99_ms'] for r in rows):.1f} ms")
        ratio = (statistics.median(r["wall"] for r in results["thread"])
                 / statistics.median(r["wall"] for r in results["process"]))
        print(f"ratio of wall times thread / process: {ratio:.2f}")

        metered, plain = [], []
        for _ in range(args.rounds):
            slots = fresh_slots(dsn, 2)
            metered.append(in_processes([spec("m", dsn, slots[0], args.changes)])["cpu"])
            plain.append(unmetered(dsn, slots[1], args.changes))
            drop_slots(dsn, slots)
        per_change = 1e6 / args.changes
        print(f"\none pipeline, CPU per change: served (meters) "
              f"{statistics.median(metered) * per_change:.1f} us, changefeed run "
              f"{statistics.median(plain) * per_change:.1f} us; ratio "
              f"{statistics.median(metered) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))
    main()
