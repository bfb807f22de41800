"""Fan-out of ``changefeed serve``: many live shape clients on one server process.

A throwaway cluster holds ``ticks`` (100 rows); ``changefeed serve`` serves it (one process).
``--clients`` clients (default 1,000) each sync the table (``offset=-1``), then stay live on
it, all in this process on one event loop (uvloop, raw HTTP/1.1 over keep-alive sockets, so the
client side stays cheap): ``--mode sse`` holds one Server-Sent Events stream each,
``--mode long-poll`` sends ``live=true`` requests one after the other. A writer updates one row
``--rate`` times a second (default 100), setting ``sent`` to the time of the write. Every client
notes when each change reaches it: fan-out latency = arrival - ``sent``, from the commit through
the replication slot, the shape log, the server's memory, to every client.

Printed: latency p50/p90/p99/max over every (change, client) pair, changes and deliveries
counted (each change must reach every client), the server's CPU (user+system seconds per second
of the run) and RSS (peak, from /proc), and this process's CPU (the clients), which shares the
machine's cores with the server and PostgreSQL.

    .venv/bin/python benchmarks/bench_sync.py [--clients 1000] [--rate 100] [--seconds 30]
                                              [--mode sse|long-poll]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from array import array
from pathlib import Path

import psycopg

from changefeed.embedded import TemporaryPostgres, free_port

CHANGEFEED = Path(sys.executable).parent / "changefeed"
SENT_VALUE = re.compile(rb'"sent":"([0-9.e+]+)"')


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Client:
    """One live client over one keep-alive connection."""

    def __init__(self, port: int, mode: str, latencies: array, counts: list[int]) -> None:
        self.port = port
        self.mode = mode
        self.latencies = latencies
        self.counts = counts
        self.live = asyncio.Event()

    async def request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      query: str) -> tuple[dict[bytes, bytes], bool]:
        writer.write(f"GET /v1/shape?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"unexpected answer: {status!r}")
        headers: dict[bytes, bytes] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return headers, headers.get(b"transfer-encoding") == b"chunked"

    async def run(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        headers, _ = await self.request(reader, writer, "table=ticks&offset=-1")
        await reader.readexactly(int(headers[b"content-length"]))
        handle = headers[b"electric-handle"].decode()
        offset = headers[b"electric-offset"].decode()
        cursor = ""
        self.live.set()
        while not stop.is_set():
            live = f"table=ticks&handle={handle}&offset={offset}&live=true&cursor={cursor}"
            if self.mode == "sse":
                headers, chunked = await self.request(reader, writer, live + "&live_sse=true")
                offset = await self.stream(reader, stop, offset)
            else:
                headers, _ = await self.request(reader, writer, live)
                body = await reader.readexactly(int(headers[b"content-length"]))
                self.note(body)
                offset = headers[b"electric-offset"].decode()
                cursor = headers.get(b"electric-cursor", b"").decode()
        writer.close()

    async def stream(self, reader: asyncio.StreamReader, stop: asyncio.Event,
                     offset: str) -> str:
        """Read one chunked SSE response to its end; the offset of its last up-to-date."""
        while not stop.is_set():
            size_line = await reader.readline()
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return offset
            chunk = await reader.readexactly(size + 2)
            self.note(chunk)
            found = chunk.rfind(b'"global_last_seen_lsn":"')
            if found >= 0:
                end = chunk.index(b'"', found + 24)
                offset = chunk[found + 24:end].decode() + "_0"
        return offset

    def note(self, data: bytes) -> None:
        now = time.time()
        for match in SENT_VALUE.finditer(data):
            self.latencies.append(now - float(match.group(1)))
            self.counts[0] += 1


def writer(dsn: str, rate: float, seconds: float, written: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = time.monotonic()
        n = 0
        while True:
            due = start + n / rate
            now = time.monotonic()
            if due - start >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            conn.execute("UPDATE ticks SET n = n + 1, sent = %s WHERE id = %s",
                         [repr(time.time()), n % 100 + 1])
            n += 1
        written[0] = n


async def run_clients(port: int, clients: int, mode: str, dsn: str, rate: float,
                      seconds: float, server_pid: int) -> dict[str, float]:
    latencies: array = array("d")
    counts = [0]
    stop = asyncio.Event()
    peers = [Client(port, mode, latencies, counts) for _ in range(clients)]
    tasks = []
    for index, peer in enumerate(peers):
        tasks.append(asyncio.create_task(peer.run(stop)))
        if index % 50 == 49:
            await asyncio.sleep(0.05)  # connect in waves, as a real crowd would
    await asyncio.wait_for(asyncio.gather(*(peer.live.wait() for peer in peers)), 120)
    await asyncio.sleep(1.0)
    counts[0] = 0
    del latencies[:]
    rss_peak = proc_rss_mb(server_pid)
    cpu_server, cpu_self = proc_cpu(server_pid), time.process_time()
    started = time.monotonic()
    written = [0]
    thread = threading.Thread(target=writer, args=(dsn, rate, seconds, written))
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.5)
        rss_peak = max(rss_peak, proc_rss_mb(server_pid))
    expected = written[0] * clients
    deadline = time.monotonic() + 10
    while counts[0] < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    elapsed = time.monotonic() - started
    cpu_server = proc_cpu(server_pid) - cpu_server
    cpu_self = time.process_time() - cpu_self
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else 0.0
    return {
        "changes": written[0], "deliveries": counts[0], "expected": expected,
        "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
        "max": ordered[-1] * 1000 if ordered else 0.0,
        "mean": statistics.fmean(ordered) * 1000 if ordered else 0.0,
        "server_cpu": cpu_server / elapsed, "clients_cpu": cpu_self / elapsed,
        "rss_peak": rss_peak, "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--mode", choices=["sse", "long-poll"], default="sse")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    # Commits flushed at once, as in production (the throwaway cluster defaults to off, and
    # walsenders send only flushed WAL: up to wal_writer_delay later).
    with TemporaryPostgres({"synchronous_commit": "on"}) as pg:
        dsn = pg.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE ticks (id int PRIMARY KEY, n int NOT NULL,"
                         " sent text)")
            conn.execute("INSERT INTO ticks SELECT g, 0, NULL FROM generate_series(1, 100) g")
        port = free_port()
        server = subprocess.Popen([str(CHANGEFEED), "serve", "--url", dsn, "--port", str(port),
                                   "--quiet", "ticks"], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit(f"serve did not start: {server.stderr.read()}"
                                         ) from None
                    time.sleep(0.2)
            idle_rss = proc_rss_mb(server.pid)
            result = asyncio.run(run_clients(port, args.clients, args.mode, dsn, args.rate,
                                             args.seconds, server.pid))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"{args.clients} {args.mode} clients, {args.rate:g} changes/s for {args.seconds:g} s"
          f" ({os.cpu_count()} cores)")
    print(f"changes written {result['changes']}, deliveries {result['deliveries']:,} of"
          f" {result['expected']:,} expected")
    print(f"fan-out latency ms: p50 {result['p50']:.1f}  p90 {result['p90']:.1f}"
          f"  p99 {result['p99']:.1f}  max {result['max']:.1f}  mean {result['mean']:.1f}")
    per_delivery = result["server_cpu"] * result["seconds"] / max(1, result["deliveries"])
    print(f"server CPU {result['server_cpu']:.2f} s/s ({per_delivery * 1e6:.1f} us per delivery),"
          f" RSS {idle_rss:.0f} MB idle, {result['rss_peak']:.0f} MB peak;"
          f" clients CPU {result['clients_cpu']:.2f} s/s")
    print(f"machine load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
          " (other work on the machine delays every process of this benchmark)")


if __name__ == "__main__":
    main()
