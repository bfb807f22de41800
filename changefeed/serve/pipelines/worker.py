"""A served pipeline's own process: ``python -m changefeed.serve.pipelines.worker FD``.

The server writes the request (the pipeline's spec, the log format) as one JSON line on its
stdin and keeps stdin open; the process builds the run exactly as ``changefeed run`` does
(`build.build`), with the meters of `meters` around it, and runs
`changefeed.delivery.deliver` until SIGTERM (deliver what it holds, acknowledge, exit 0), its
``limit`` or ``idle_timeout``, or a failure. Logs go to stderr (the server's), labelled with the
pipeline. Every `REPORT_SECONDS` it writes its state and counts as one JSON line to FD; its last
line says how it ended (`ended`): ``finished``, ``stopped``, or ``failed`` with whether a
restart may cure it (`is_transient`).

It stops on its own when the server's process goes away, however it ends: the EOF of stdin
says so (`watch_server`); it then stops as on SIGTERM, and exits at once if that takes longer
than the pipeline's ``stop_timeout``, since no supervisor is left to kill it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from changefeed.cli.common import ACK_SECONDS, setup_logging
from changefeed.delivery import Progress, deliver
from changefeed.errors import (
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    PipelineError,
    ResumeError,
    TransientBackendError,
    first_line,
)
from changefeed.redact import redact, register_secret
from changefeed.serve.pipelines.build import build
from changefeed.serve.pipelines.meters import (
    SNAPSHOT_RECENT,
    CountingRetry,
    Labeling,
    MeasuredOutput,
    MeasuredSink,
    SinkMeter,
)
from changefeed.serve.pipelines.specs import PipelineSpec, Supervision

log = logging.getLogger("changefeed.serve")

REPORT_SECONDS = 0.5
"""How often the process reports its state and counts."""
WAL_SECONDS = 5.0
"""How often a PostgreSQL pipeline asks the server how much WAL its slot holds."""


def is_transient(exc: BaseException, feed: Any = None) -> bool:
    """Whether restarting the pipeline may cure ``exc``, the error that ended its run.

    Not: a configuration the source or the sink refuses (a missing table, no privilege,
    ``wal_level``), a position that cannot be resumed, an error of a stage (the same change
    would meet it again). Yes: a sink that gave up retrying, a source that could not be
    reached when the run began (a server that is down may come up), anything unexpected."""
    if isinstance(exc, (ConfigurationError, ResumeError)):
        return False
    if isinstance(exc, PipelineError):
        return not exc.message.startswith("stage ")
    if isinstance(exc, PermanentBackendError):
        # A feed that never reached its server says so as a permanent error; its cause tells
        # whether the server could not be reached (transient) or refused (permanent).
        cause = exc.__cause__
        if isinstance(cause, TransientBackendError):
            return True
        return cause is not None and feed is not None and not isinstance(
            cause, ChangefeedError) and _feed_says_transient(feed, cause)
    return True


def _feed_says_transient(feed: Any, cause: BaseException) -> bool:
    try:
        return bool(feed.is_transient(cause))
    except Exception:
        return False


class _Reporter:
    """JSON lines to the server, whole, one at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, default=str).encode() + b"\n"
        with self.lock:
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                pass  # the server is gone; the parent check stops the run


class _LastWarning(logging.Handler):
    """Keeps the last warning or error the pipeline logged, for its health details."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: dict[str, Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = {"message": redact(record.getMessage()), "time": record.created}


class _WalProbe:
    """Asks the PostgreSQL server how far the slot is behind and how much WAL it keeps."""

    QUERY = (
        "SELECT pg_wal_lsn_diff(w.lsn, s.confirmed_flush_lsn)::bigint,"
        " pg_wal_lsn_diff(w.lsn, s.restart_lsn)::bigint"
        " FROM pg_replication_slots s, (SELECT CASE WHEN pg_is_in_recovery()"
        " THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END AS lsn) w"
        " WHERE s.slot_name = %s"
    )

    def __init__(self, feed: Any) -> None:
        self.feed = feed
        self.conn: Any = None
        self.estimates: dict[str, int] = {}

    def probe(self, snapshot_tables: list[str]) -> dict[str, Any] | None:
        import psycopg

        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.feed.dsn, autocommit=True, connect_timeout=5,
                                            application_name="changefeed-metrics")
            row = self.conn.execute(self.QUERY, [self.feed.slot]).fetchone()
            for table in snapshot_tables:
                if table not in self.estimates:
                    (rows,) = self.conn.execute(
                        "SELECT coalesce(max(reltuples), -1)::bigint FROM pg_class"
                        " WHERE oid = to_regclass(%s)", [table]).fetchone() or (-1,)
                    self.estimates[table] = rows
        except psycopg.Error as exc:
            log.debug("cannot read the slot's WAL figures: %s", first_line(exc))
            self.close()
            return None
        if row is None:
            return None
        return {"lag_bytes": row[0], "retained_bytes": row[1]}

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None


class PipelineRun:
    """One run of a pipeline in this process: built, measured, delivered, reported."""

    def __init__(self, spec: PipelineSpec, send: Any, quiet: bool = False) -> None:
        self.spec = spec
        self.send = send
        self.quiet = quiet or bool(spec.options.get("quiet"))
        self.stop_requested = False
        self.done = threading.Event()
        self.meter = SinkMeter()
        self.warnings = _LastWarning()
        self.source_retries = 0
        self.source_retry_at = 0.0
        self.output: MeasuredOutput | None = None
        self.feed: Any = None
        self.activity = time.monotonic()
        self.last_read = -1
        self.wal: dict[str, Any] | None = None
        self.wal_probe: _WalProbe | None = None
        self.reporter: threading.Thread | None = None

    def stop(self) -> None:
        """Stop cleanly at the next change (safe from a signal handler)."""
        self.stop_requested = True
        if self.feed is not None:
            self.feed.stop()

    def run(self) -> int:
        """Run to the end; returns the exit code."""
        logging.getLogger("changefeed").addHandler(self.warnings)
        try:
            built = build(self.spec)
        except ChangefeedError as exc:
            self.send({"t": "ended", "outcome": "failed", "transient": False,
                       "error": redact(exc.message)})
            return exc.exit_code
        feed = self.feed = built.feed
        options = built.options
        feed.retry = CountingRetry.around(feed.retry, self._source_retried)
        parts = built.parts
        sink = MeasuredSink(parts.sink, self.meter)
        letters = (MeasuredSink(parts.dead_letter, self.meter, dead_letters=True)
                   if parts.dead_letter is not None else None)
        from changefeed.pipelines.pipeline import Pipeline

        pipeline = Pipeline(feed, [*parts.stages, Labeling(parts.encode)], sink=sink,
                            dead_letter=letters, processes=options.processes,
                            workers=options.workers,
                            ack_interval=ACK_SECONDS)
        output = self.output = MeasuredOutput(pipeline.output(), on_open=self._start_reporter)
        if getattr(feed, "slot", None) and getattr(feed, "dsn", None):
            self.wal_probe = _WalProbe(feed)
        outcome: dict[str, Any]
        code = 0
        try:
            if self.stop_requested:
                feed.stop()
            result = deliver(feed, output, limit=options.limit, idle_timeout=options.idle_timeout,
                             ack_interval=ACK_SECONDS, progress=Progress(feed, self.quiet))
            if result.reader_gone:
                outcome = {"outcome": "failed", "transient": True,
                           "error": "the reader of stdout went away"}
            elif self.stop_requested:
                outcome = {"outcome": "stopped"}
            else:
                outcome = {"outcome": "finished", "delivered": result.count}
        except KeyboardInterrupt:  # a second stop signal: leave at once
            outcome = {"outcome": "stopped", "forced": True}
        except Exception as exc:
            message = exc.message if isinstance(exc, ChangefeedError) else (
                f"{type(exc).__name__}: {exc}")
            transient = is_transient(exc, feed)
            if not isinstance(exc, ChangefeedError):
                log.error("unexpected failure", exc_info=exc)
            outcome = {"outcome": "failed", "transient": transient, "error": redact(message)}
            code = exc.exit_code if isinstance(exc, ChangefeedError) else 1
        finally:
            self.done.set()
            if self.reporter is not None:
                self.reporter.join()
            if self.wal_probe is not None:
                self.wal_probe.close()
        self.send(self.stats())
        self.send({"t": "ended", **outcome})
        return code

    def _source_retried(self) -> None:
        self.source_retries += 1
        self.source_retry_at = time.monotonic()

    def _start_reporter(self) -> None:
        self.reporter = threading.Thread(target=self._report_loop, name="changefeed-report",
                                         daemon=True)
        self.reporter.start()

    def _report_loop(self) -> None:
        next_wal = 0.0
        while not self.done.wait(REPORT_SECONDS):
            if self.stop_requested and self.feed is not None and not self.feed.stopping:
                self.feed.stop()  # a stop that came before the run began reading
            now = time.monotonic()
            if self.wal_probe is not None and now >= next_wal:
                tables = [row[0] for row in self.meter.current()["snapshot_rows"]]
                self.wal = self.wal_probe.probe(tables)
                next_wal = now + WAL_SECONDS
            self.send(self.stats())

    def state(self, sink: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The pipeline's state now, and what it is retrying (if it is)."""
        output, now = self.output, time.monotonic()
        if output is not None and output.read != self.last_read:
            self.last_read = output.read
            self.activity = now
        if output is not None:
            self.activity = max(self.activity, output.last_activity)
        if self.source_retry_at > self.activity:
            return "retrying", {"side": "source", "retries": self.source_retries}
        if sink["retrying_since"] is not None:
            return "retrying", {"side": "sink", "since": sink["retrying_since"]}
        feed = self.feed
        if output is None or feed is None or not (feed.connected_once or output.read):
            return "starting", None
        if now - output.last_snapshot_put < SNAPSHOT_RECENT:
            return "snapshotting", None
        return "streaming", None

    def stats(self) -> dict[str, Any]:
        sink = self.meter.current()
        state, retrying = self.state(sink)
        output = self.output
        return {
            "t": "stats",
            "state": state,
            "retrying": retrying,
            "read": output.read if output is not None else 0,
            "handled": output.handled if output is not None else 0,
            "lag_seconds": output.lag_seconds() if output is not None else 0.0,
            "wal": self.wal,
            "snapshot_estimates": dict(self.wal_probe.estimates) if self.wal_probe else {},
            "sink": sink,
            "source_retries": self.source_retries,
            "warning": self.warnings.last,
            "slot": getattr(self.feed, "slot", None),
            "pid": os.getpid(),
        }


def spec_of(data: dict[str, Any]) -> PipelineSpec:
    """The spec `PipelineSpec.to_json` wrote."""
    return PipelineSpec(data["name"], data["options"], data["source"], True, Supervision(),
                        tuple(data.get("secrets", ())))


PARENT_GONE_EXIT = 70
"""The exit code of a process that the server's going away ended before it could stop."""


def watch_server(run: PipelineRun, stdin: Any, stop_timeout: float) -> threading.Thread:
    """A thread that waits for the EOF of ``stdin`` (the server holds the other end open until
    the process ended), then stops ``run``, and ends the process if it has not stopped within
    ``stop_timeout`` seconds."""

    def watch() -> None:
        while stdin.read(1 << 12):  # nothing more is written: only the EOF matters
            pass
        if run.done.is_set():
            return
        log.warning("the server's process went away: stopping")
        run.stop()
        if not run.done.wait(stop_timeout):
            log.error("did not stop within %.0f s of the server going away: exiting; what was"
                      " not acknowledged comes again on the next run", stop_timeout)
            os._exit(PARENT_GONE_EXIT)

    thread = threading.Thread(target=watch, name="changefeed-server-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    reporter = _Reporter(int(args[0]))
    line = sys.stdin.buffer.readline()
    if not line.strip():  # the server went away before it sent the request
        sys.exit(PARENT_GONE_EXIT)
    request = json.loads(line)
    spec = spec_of(request["spec"])
    for secret in spec.secrets:
        register_secret(secret)
    quiet = bool(request.get("quiet")) or bool(spec.options.get("quiet"))
    setup_logging(quiet, request.get("log_format", "text"), pipeline=spec.name)
    run = PipelineRun(spec, reporter.send, quiet=quiet)

    def on_signal(signum: int, frame: Any) -> None:
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watch_server(run, sys.stdin.buffer.raw, float(request.get("stop_timeout") or 30.0))
    sys.exit(run.run())


if __name__ == "__main__":
    main()
