"""Supervision: each pipeline in a process of its own, watched by a thread of the server.

A `Supervisor` starts its pipeline's process (`worker`), reads its reports, and when the
process ends decides: stopped or finished (done), failed for good (``failed``: a missing table,
a stage that raises), or failed in a way a restart may cure (``retrying``: the process is
started again after a backoff that doubles per failure in a row, from ``restart_delay`` up to
``restart_max_delay``, and starts over after a run that lasted `STABLE_SECONDS`). A process
that dies without a word (SIGKILL, out of memory, a crash in a driver) counts as curable.
Nothing a supervisor does touches another pipeline: each has its own process, pipe and thread.

Stopping sends SIGTERM: the pipeline delivers what it holds, acknowledges, and exits; after
``stop_timeout`` seconds its process group is killed (what it had not acknowledged comes again
on the next run). A pipeline's process also stops when the server's process goes away, however
it ends (``kill -9`` too): its stdin, which only the server holds open, then reads EOF (see
`changefeed.serve.pipelines.worker`).

Counters survive the pipeline's restarts: the supervisor adds up the runs (`Totals`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from changefeed.serve.pipelines.meters import LATENCY_BUCKETS
from changefeed.serve.pipelines.specs import PipelineSpec

log = logging.getLogger("changefeed.serve")

STATES = ("starting", "snapshotting", "streaming", "retrying", "stopping", "stopped",
          "finished", "failed", "disabled")
"""What a pipeline can be doing (``changefeed_pipeline_state`` and the health details)."""
READY_STATES = frozenset({"snapshotting", "streaming", "finished", "disabled"})
"""States in which a pipeline does what it is meant to: ``/readyz`` needs one of them."""
STABLE_SECONDS = 60.0
"""A run that lasted this long before it failed starts the backoff over (a pipeline that fails
soon after each start backs off to ``restart_max_delay``, streaming or not)."""


@dataclass
class Totals:
    """Counts added up over the runs of one pipeline (what the metrics show)."""

    read: int = 0
    delivered: dict[tuple[str, str], int] = field(default_factory=dict)
    snapshot_rows: dict[str, int] = field(default_factory=dict)
    items: int = 0
    bytes: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    sink_retries: int = 0
    source_retries: int = 0
    dead_letters: int = 0

    def add(self, stats: dict[str, Any]) -> None:
        """Add a run's last cumulative report."""
        sink = stats.get("sink") or {}
        self.read += stats.get("read", 0)
        for table, op, count in sink.get("delivered", ()):
            self.delivered[(table, op)] = self.delivered.get((table, op), 0) + count
        for table, count in sink.get("snapshot_rows", ()):
            self.snapshot_rows[table] = self.snapshot_rows.get(table, 0) + count
        self.items += sink.get("items", 0)
        self.bytes += sink.get("bytes", 0)
        for index, count in enumerate(sink.get("buckets", ())):
            self.buckets[index] += count
        self.latency_sum += sink.get("latency_sum", 0.0)
        self.sink_retries += sink.get("retries", 0)
        self.source_retries += stats.get("source_retries", 0)
        self.dead_letters += sink.get("dead_letters", 0)

    def plus(self, stats: dict[str, Any] | None) -> Totals:
        """These totals and a running run's report."""
        total = Totals(self.read, dict(self.delivered), dict(self.snapshot_rows), self.items,
                       self.bytes, list(self.buckets), self.latency_sum, self.sink_retries,
                       self.source_retries, self.dead_letters)
        if stats is not None:
            total.add(stats)
        return total


@dataclass
class Snapshot:
    """A supervisor's state at one moment, for metrics and health (a copy)."""

    name: str
    state: str
    enabled: bool
    totals: Totals
    restarts: int
    stats: dict[str, Any] | None
    error: str | None
    since: float
    retry_at: float | None
    pid: int | None


class Supervisor:
    """Runs one pipeline (see the module's notes); thread-safe."""

    def __init__(self, spec: PipelineSpec, *, log_format: str = "text", quiet: bool = False,
                 python: str = sys.executable) -> None:
        self.spec = spec
        self.name = spec.name
        self.log_format = log_format
        self.quiet = quiet
        self.python = python
        self.lock = threading.Lock()
        self.state = "starting" if spec.enabled else "disabled"
        self.since = time.time()
        self.error: str | None = None
        self.restarts = 0
        self.retry_at: float | None = None
        self.totals = Totals()
        self.stats: dict[str, Any] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.crashed = False

    # -- control (from the server's event loop) --------------------------------------------------

    def start(self) -> None:
        if not self.spec.enabled:
            return
        self.thread = threading.Thread(target=self._supervise, name=f"pipeline-{self.name}",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the pipeline cleanly and wait for it (see the module's notes); blocking."""
        self.stopping.set()
        with self.lock:
            process = self.process
            if process is not None and process.poll() is None:
                self._set_state("stopping")
        if process is not None:
            _signal(process, signal.SIGTERM)
        if self.thread is not None:
            self.thread.join()

    @property
    def alive(self) -> bool:
        """False only if the supervising thread died of an unexpected error (a bug)."""
        return not self.crashed

    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(self.name, self.state, self.spec.enabled, self.totals.plus(self.stats),
                            self.restarts, self.stats, self.error, self.since, self.retry_at,
                            self.process.pid if self.process is not None else None)

    # -- the supervising thread ------------------------------------------------------------------

    def _set_state(self, state: str, error: str | None = None) -> None:
        """Under the lock."""
        if state != self.state:
            self.state = state
            self.since = time.time()
        if error is not None or state in ("streaming", "snapshotting"):
            self.error = error

    def _supervise(self) -> None:
        failures = 0
        supervision = self.spec.supervision
        try:
            while not self.stopping.is_set():
                outcome, stable = self._run_once()
                kind = outcome.get("outcome")
                error = outcome.get("error")
                with self.lock:
                    if self.stopping.is_set() or kind == "stopped":
                        self._set_state("stopped")
                        log.info("stopped", extra={"pipeline": self.name})
                        return
                    if kind == "finished":
                        self._set_state("finished")
                        log.info("finished", extra={"pipeline": self.name})
                        return
                    if not outcome.get("transient", True):
                        self._set_state("failed", error)
                        log.error("failed: %s", error, extra={
                            "pipeline": self.name, "fields": {"state": "failed"}})
                        return
                    failures = 1 if stable else failures + 1
                    ceiling = min(supervision.restart_max_delay,
                                  supervision.restart_delay * 2 ** (failures - 1))
                    delay = random.uniform(ceiling / 2, ceiling)
                    self.retry_at = time.time() + delay
                    self._set_state("retrying", error)
                    log.warning("%s; restarting in %.1f s", error or "ended", delay, extra={
                        "pipeline": self.name,
                        "fields": {"state": "retrying", "delay": round(delay, 3)}})
                if self.stopping.wait(delay):
                    break
                with self.lock:
                    self.restarts += 1
                    self.retry_at = None
            with self.lock:
                self._set_state("stopped")
        except Exception:  # a bug: say so; health shows the service as not alive
            log.exception("the supervisor failed", extra={"pipeline": self.name})
            with self.lock:
                self.crashed = True
                self._set_state("failed", "the supervisor failed (see the log)")

    def _run_once(self) -> tuple[dict[str, Any], bool]:
        """Run the pipeline's process to its end: how it ended, and whether it lasted
        `STABLE_SECONDS`."""
        read_fd, write_fd = os.pipe()
        request = json.dumps({"spec": self.spec.to_json(), "log_format": self.log_format,
                              "quiet": self.quiet,
                              "stop_timeout": self.spec.supervision.stop_timeout}).encode()
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [self.python, "-m", "changefeed.serve.pipelines.worker", str(write_fd)],
                stdin=subprocess.PIPE, pass_fds=(write_fd,), start_new_session=True,
            )
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            return {"outcome": "failed", "transient": True,
                    "error": f"cannot start the pipeline's process: {exc}"}, False
        os.close(write_fd)
        with self.lock:
            self.process = process
            self.stats = None
            if self.state != "stopping":
                self._set_state("starting")
        log.info("started (pid %s)", process.pid, extra={
            "pipeline": self.name, "fields": {"pid": process.pid}})
        if self.stopping.is_set():  # a stop that came while the process was being made
            _signal(process, signal.SIGTERM)
        # One line of request; stdin then stays open, unwritten, until the process ended: the
        # process reads its EOF as the server having gone away (killed, crashed) and stops.
        try:
            assert process.stdin is not None
            process.stdin.write(request + b"\n")
            process.stdin.flush()
        except OSError:
            pass  # it died at once: its exit code says so
        ended: dict[str, Any] | None = None
        buffer = b""
        kill_at: float | None = None
        try:
            while True:
                ready, _, _ = select.select([read_fd], [], [], 0.5)
                if ready:
                    data = os.read(read_fd, 1 << 16)
                    if not data:
                        break
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        message = _parse(line)
                        if message is None:
                            continue
                        if message.get("t") == "ended":
                            ended = message
                        elif message.get("t") == "stats":
                            self._took(message)
                elif process.poll() is not None:
                    break  # exited; a process it forked may still hold the pipe
                if self.stopping.is_set():
                    timeout = self.spec.supervision.stop_timeout
                    kill_at = kill_at or time.monotonic() + timeout
                    if time.monotonic() >= kill_at and process.poll() is None:
                        log.warning("did not stop within %.0f s: killing it", timeout,
                                    extra={"pipeline": self.name})
                        _signal(process, signal.SIGKILL, group=True)
        finally:
            os.close(read_fd)
        code = process.wait()
        try:
            assert process.stdin is not None
            process.stdin.close()
        except OSError:
            pass
        stable = time.monotonic() - started >= STABLE_SECONDS
        with self.lock:
            if self.stats is not None:
                self.totals.add(self.stats)
            self.stats = None
            self.process = None
        if ended is None:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            ended = {"outcome": "stopped" if self.stopping.is_set() and code in (
                0, -signal.SIGTERM) else "failed", "transient": True,
                "error": f"the pipeline's process ended without a word ({how})"}
        return ended, stable

    def _took(self, stats: dict[str, Any]) -> None:
        with self.lock:
            self.stats = stats
            if self.state in ("stopping",):
                return
            state = stats.get("state", "starting")
            retrying = stats.get("retrying")
            error = None
            if state == "retrying" and retrying is not None:
                warning = stats.get("warning") or {}
                error = warning.get("message") or f"the {retrying.get('side')} is retrying"
            self._set_state(state, error)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _signal(process: subprocess.Popen[bytes], signum: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["READY_STATES", "STATES", "Snapshot", "Supervisor", "Totals"]
