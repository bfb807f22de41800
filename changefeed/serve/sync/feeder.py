"""`Feeder`: the thread that feeds the shape log while this process holds the schema's advisory
lock (one feeder among ``serve`` processes), and compacts it meanwhile."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import psycopg

from changefeed import ChangefeedError, Pipeline, get_changefeed
from changefeed.errors import first_line
from changefeed.serve.sync.log import compact, fence_prefix, lock_key, slot_name
from changefeed.serve.sync.log_sink import LogSink
from changefeed.serve.sync.values import TableInfo

log = logging.getLogger("changefeed.serve.sync")

BATCH_SECONDS = 0.01
"""The longest a change waits for others to be logged in one transaction with it."""


class Feeder(threading.Thread):
    """Feeds the log while this process holds the schema's advisory lock (one feeder
    among ``serve`` processes), and compacts it every ``compact_interval`` seconds meanwhile.

    ``state`` is ``starting``, ``standby`` (another process feeds), ``streaming``, ``failed``
    (``error`` says why; it tries again after ``retry_seconds``) or ``stopped``.
    """

    def __init__(self, url: str, schema: str, tables: Sequence[TableInfo], *,
                 log_window: float, tombstone_window: float, compact_interval: float,
                 retry_seconds: float = 2.0) -> None:
        super().__init__(name="changefeed-sync-feeder", daemon=True)
        self.url = url
        self.schema = schema
        self.tables = list(tables)
        self.log_window = log_window
        self.tombstone_window = tombstone_window
        self.compact_interval = compact_interval
        self.retry_seconds = retry_seconds
        self.state = "starting"
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        self._stopping = threading.Event()
        self._pipeline: Pipeline | None = None
        self.sink: LogSink | None = None

    def _set(self, state: str, error: BaseException | None = None) -> None:
        with self.changed:
            self.state = state
            self.error = error
            self.changed.notify_all()

    def wait_settled(self, timeout: float) -> str:
        """Wait until the feeder streams, stands by or failed (at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.state == "starting" and time.monotonic() < deadline:
                self.changed.wait(max(0.0, deadline - time.monotonic()))
            return self.state

    def stop(self) -> None:
        """Stop feeding: the pipeline delivers and acknowledges what it has, then ends."""
        self._stopping.set()
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.stop()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as lock_conn:
                    held = lock_conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                             [lock_key(self.schema)]).fetchone()
                    if not (held and held[0]):
                        if self.state != "standby":
                            log.info("another serve process feeds the shape log: standing by")
                        self._set("standby")
                        self._stopping.wait(self.retry_seconds)
                        continue
                    self._feed(lock_conn)
            except Exception as exc:  # the loop goes on: another attempt after a pause
                if self._stopping.is_set():
                    break
                log.error("shape log feed failed: %s; trying again in %.0f s", first_line(exc),
                          self.retry_seconds * 5)
                log.debug("shape log feed failure", exc_info=True)
                self._set("failed", exc)
                self._stopping.wait(self.retry_seconds * 5)
        self._set("stopped", self.error)

    def _feed(self, lock_conn: psycopg.Connection) -> None:
        name = slot_name(self.schema)
        feed = get_changefeed(self.url, [t.qualified for t in self.tables], prefeed="snapshot",
                              slot=name, publication=name, snapshot_markers=True,
                              status_interval=1.0, messages=[fence_prefix(self.schema)])
        self.sink = LogSink(self.url, self.schema, self.tables)
        # Batches close after at most BATCH_SECONDS: a change waits no longer to be logged.
        pipeline = Pipeline(feed, sink=self.sink, batch_size=1000, batch_seconds=BATCH_SECONDS)
        self._pipeline = pipeline
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                pipeline.run()
            except BaseException as exc:  # reported by the feeder's loop
                outcome.append(exc)

        runner = threading.Thread(target=run, name="changefeed-sync-pipeline", daemon=True)
        runner.start()
        next_compaction = time.monotonic() + min(self.compact_interval, 5.0)
        try:
            while runner.is_alive():
                if self.state != "streaming" and feed.connected_once:
                    log.info("feeding the shape log (%s) from slot %s", self.schema, name)
                    self._set("streaming")
                runner.join(0.2)
                if self._stopping.is_set():
                    pipeline.stop()
                    continue
                if time.monotonic() >= next_compaction and self.state == "streaming":
                    compact(lock_conn, self.schema, self.log_window, self.tombstone_window)
                    next_compaction = time.monotonic() + self.compact_interval
        finally:
            pipeline.stop()
            runner.join()
            self._pipeline = None
        if outcome:
            raise outcome[0]
        if not self._stopping.is_set():
            raise ChangefeedError("the shape log's feed ended")


__all__ = ["BATCH_SECONDS", "Feeder"]
