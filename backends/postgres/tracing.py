"""An opt-in trace of where a change's latency goes, for ``benchmarks/bench_latency.py``.

With ``CHANGEFEED_LATENCY_TRACE=<file>`` in its environment (read once, when the stream
starts; without it the stream loop carries no trace and pays nothing), a PostgreSQL feed appends
one JSON line per transaction to the file when its stream ends: the commit time (pgoutput's
Commit), the walsender's send time of the Commit's frame (the XLogData header's ``sendTime``),
when the loop took that frame, and when the consumer had flushed its output after it (the next
time the stream had nothing at hand). And one line per garbage collection: its generation, when
and how long. Same machine, same clock: the differences split commit -> stdout into the
server's share, the transport's and the client's."""

from __future__ import annotations

import gc
import os
import time
from datetime import datetime
from typing import Any

import orjson

TRACE_VARIABLE = "CHANGEFEED_LATENCY_TRACE"
PG_EPOCH = 946_684_800
"""2000-01-01 in Unix seconds: where PostgreSQL's timestamps on the wire count from."""


class LatencyTrace:
    """The trace of one stream (see the module): `committed` at each Commit, `flushed` once the
    consumer flushed, `close` at the stream's end."""

    LIMIT = 2_000_000
    """Transactions kept at most (a trace is for a benchmark's seconds, not a service's days)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pending: list[tuple[float, float, float]] = []
        self.rows: list[tuple[float, float, float, float]] = []
        self.collections: list[tuple[int, float, float]] = []
        self.stalls: list[tuple[float, float]] = []
        self.slow_flushes: list[tuple[float, float]] = []
        self._gc_started = self._flushed_at = self._handed_over_at = 0.0
        gc.callbacks.append(self._on_gc)

    @classmethod
    def from_environment(cls) -> LatencyTrace | None:
        path = os.environ.get(TRACE_VARIABLE)
        return cls(path) if path else None

    def committed(self, committed_at: datetime, sent_at: int) -> None:
        """A Commit was taken from the stream now; ``sent_at``: its frame's send time (PostgreSQL
        microseconds, 0 if unknown)."""
        if len(self.rows) + len(self.pending) < self.LIMIT:
            sent = sent_at / 1e6 + PG_EPOCH if sent_at else 0.0
            self.pending.append((committed_at.timestamp(), sent, time.time()))

    def handing_over(self) -> None:
        """The loop lets the consumer flush now (a None tick)."""
        self._handed_over_at = time.time()

    def flushed(self) -> None:
        """The consumer has flushed what the transactions taken so far wrote (noted when that
        took 1 ms or more: a reader of the output behind, the pipe full)."""
        now = time.time()
        self._flushed_at = now
        took = (now - self._handed_over_at) * 1000
        if took >= 1.0 and len(self.slow_flushes) < self.LIMIT:
            self.slow_flushes.append((self._handed_over_at, took))
        if self.pending:
            self.rows.extend((*row, now) for row in self.pending)
            self.pending.clear()

    def quiet_work(self) -> None:
        """The loop is done with what it does while the stream is quiet (status updates, the
        catalog and idle checks) and waits for the socket: noted when that took 1 ms or more."""
        took = (time.time() - self._flushed_at) * 1000
        if took >= 1.0 and len(self.stalls) < self.LIMIT:
            self.stalls.append((self._flushed_at, took))

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif len(self.collections) < self.LIMIT:
            self.collections.append((info["generation"], time.time(),
                                     (time.perf_counter() - self._gc_started) * 1000))

    def close(self) -> None:
        """Append what was traced to the file."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        with open(self.path, "ab") as file:
            for commit, sent, read, flushed in self.rows:
                file.write(orjson.dumps({"commit": commit, "sent": sent, "read": read,
                                         "flushed": flushed}) + b"\n")
            for generation, at, milliseconds in self.collections:
                file.write(orjson.dumps({"gc": generation, "at": at, "ms": milliseconds}) + b"\n")
            for at, milliseconds in self.stalls:
                file.write(orjson.dumps({"quiet_work": at, "ms": milliseconds}) + b"\n")
            for at, milliseconds in self.slow_flushes:
                file.write(orjson.dumps({"flush": at, "ms": milliseconds}) + b"\n")
        self.rows.clear()
        self.stalls.clear()
        self.slow_flushes.clear()
        self.collections.clear()
