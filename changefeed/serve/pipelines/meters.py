"""What a served pipeline measures, by wrapping the parts ``changefeed run`` builds (no hooks in
the core): the sink, the pipeline's output, and the retry policies.

* `Labeled` / `Labeling`: the format stage (or none) wrapped so that each item carries the
  table, operation and snapshot flag of the change it was made from, to the sink;
* `MeasuredSink`: unwraps those items for the real sink and counts what it confirmed (by table
  and operation), their size as JSON lines, how long each batch took, dead letters; it runs
  where the sink runs (the sink thread, or the sink's own process with ``processes = true``) and
  keeps its counts in a `SinkMeter`, which crosses a process boundary through a pipe;
* `MeasuredOutput`: around the pipeline's output in the feed's thread, the changes read and the
  commit time of the oldest one not yet delivered (the lag in seconds);
* `CountingRetry`: a `Retry` that notes each wait (retries, and since when one is retrying).
"""

from __future__ import annotations

import bisect
import collections
import json
import operator
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from changefeed.change import Change, Operation
from changefeed.delivery import Output
from changefeed.formats.codec import dumps, dumps_line
from changefeed.pipelines.sinks import Batch, JsonLinesSink, Sink, as_sink, jsonable
from changefeed.retry import Retry

_Fragment = getattr(orjson, "Fragment", None)
"""Already encoded JSON that orjson writes as it is (None in an orjson without it)."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the sink latency histogram; +Inf is implied."""
_OPERATIONS = {op: (op.name or "").lower() for op in Operation}
SNAPSHOT_RECENT = 2.0
"""A pipeline that put a snapshot row within this many seconds is snapshotting."""


class Labeled:
    """An item on its way to a `MeasuredSink`, with the labels of the change it came from:
    ``key`` is ``(table, operation, snapshot)``, one shared tuple per combination."""

    __slots__ = ("item", "key")

    def __init__(self, item: Any, key: tuple[str, str, bool]) -> None:
        self.item = item
        self.key = key

    def __getstate__(self) -> tuple[Any, tuple[str, str, bool]]:
        return (self.item, self.key)

    def __setstate__(self, state: tuple[Any, tuple[str, str, bool]]) -> None:
        self.item, self.key = state


_NO_LABELS = ("", "", False)
_key_of = operator.attrgetter("key")


class Labeling:
    """The last stage of a served pipeline: ``encode`` (the format stage, or None) applied to an
    item, its result `Labeled` with the table and operation of the change it was (items that
    are not changes, which a Python stage may make, get empty labels).

    It fails exactly where ``encode`` fails, under ``encode``'s name, so a served pipeline
    dead-letters and reports as ``changefeed run`` does."""

    __slots__ = ("encode", "name", "keys")

    def __init__(self, encode: Callable[[Any], Any] | None) -> None:
        from changefeed.pipelines.stages import stage_name

        self.encode = encode
        self.name = stage_name(encode) if encode is not None else "labeling"
        self.keys: dict[str, list[tuple[str, str, bool] | None]] = {}
        """Per table, the label keys by ``2 * operation + snapshot``: made once, then looked up
        without hashing an enum or making a tuple (this runs once per change)."""

    def __call__(self, item: Any) -> Labeled:
        made = self.encode(item) if self.encode is not None else item
        if item.__class__ is not Change:
            return Labeled(made, _NO_LABELS)
        keys = self.keys.get(item.table)
        if keys is None:
            keys = self.keys[item.table] = [None] * (2 * max(Operation).value + 2)
        index = 2 * item.operation._value_ + item.snapshot
        key = keys[index]
        if key is None:
            key = keys[index] = (item.table, _OPERATIONS[item.operation], item.snapshot)
        return Labeled(made, key)


class SinkMeter:
    """The counts of a `MeasuredSink` (cumulative), read by the pipeline process's reporter.

    In the process that made it, `snapshot` reads the counts under a lock. In a process of its
    own (``processes = true`` forks the sink's), it writes a snapshot as one JSON line to
    ``pipe_fd`` every `interval` seconds while it changes and when the sink closes; the
    reporter reads them with `take_remote`.
    """

    interval = 0.5

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivered: collections.Counter[tuple[str, str]] = collections.Counter()
        self.snapshot_rows: collections.Counter[str] = collections.Counter()
        self.items = 0
        self.bytes = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.retries = 0
        self.retrying_since: float | None = None
        """Wall time of the first retry of the batch in hand; None once a batch went out."""
        self.dead_letters = 0
        self.last_snapshot_at = 0.0
        self.home = os.getpid()
        self.read_fd, self.pipe_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._flusher: threading.Thread | None = None
        self._dirty = threading.Event()
        self._remote: dict[str, Any] | None = None
        self._buffer = b""

    # -- in the sink's process -----------------------------------------------------------------

    def delivered_batch(self, labels: list[Labeled], seconds: float, size: int) -> None:
        counted = collections.Counter(map(_key_of, labels))
        with self.lock:
            delivered, snapshot_rows = self.delivered, self.snapshot_rows
            for (table, operation, snapshot), count in counted.items():
                delivered[(table, operation)] += count
                if snapshot:
                    snapshot_rows[table] += count
                    self.last_snapshot_at = time.time()
            self.items += len(labels)
            self.bytes += size
            self.retrying_since = None
            self._observe(seconds)
        self._changed()

    def failed_batch(self, seconds: float) -> None:
        with self.lock:
            self._observe(seconds)
        self._changed()

    def retried(self) -> None:
        with self.lock:
            self.retries += 1
            if self.retrying_since is None:
                self.retrying_since = time.time()
        self._changed()

    def dead_lettered(self, count: int) -> None:
        with self.lock:
            self.dead_letters += count
        self._changed()

    def _observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def _changed(self) -> None:
        if os.getpid() == self.home:
            return
        self._dirty.set()
        if self._flusher is None:  # the first update in a forked sink process
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name="changefeed-sink-meter")
            self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            self.send()
            time.sleep(self.interval)

    def send(self) -> None:
        """Write the counts to the pipe (from a sink process; at most 64 kB are written at once,
        and one process writes, so the line arrives whole)."""
        line = json.dumps(self.snapshot()).encode() + b"\n"
        try:
            os.write(self.pipe_fd, line)
        except OSError:
            pass  # the pipeline's process is gone: nobody reads the counts any more

    def close(self) -> None:
        """In a sink process: send the final counts."""
        if os.getpid() != self.home:
            self.send()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "delivered": [[table, op, count] for (table, op), count in self.delivered.items()],
                "snapshot_rows": [[table, count] for table, count in self.snapshot_rows.items()],
                "items": self.items,
                "bytes": self.bytes,
                "buckets": list(self.buckets),
                "latency_sum": self.latency_sum,
                "retries": self.retries,
                "retrying_since": self.retrying_since,
                "dead_letters": self.dead_letters,
                "last_snapshot_at": self.last_snapshot_at,
            }

    # -- in the pipeline's process ---------------------------------------------------------------

    def current(self) -> dict[str, Any]:
        """The latest counts: this process's own, or the last a sink process sent."""
        self.take_remote()
        if self._remote is not None:
            return self._remote
        return self.snapshot()

    def take_remote(self) -> None:
        while True:
            try:
                data = os.read(self.read_fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in reversed(lines):
                try:
                    self._remote = json.loads(line)
                    break
                except ValueError:  # a line cut short by a sink process that was killed
                    continue


class MeasuredSink(Sink):
    """The sink of a served pipeline: gives ``inner`` the items without their labels and counts
    what it confirmed in ``meter``. As a dead-letter sink (``dead_letters=True``) it counts the
    records it wrote.

    The size of what was delivered is the items' JSON lines. A file sink is given each item
    already encoded (an ``orjson.Fragment``, which it writes as it is), so the line is made
    once; other sinks encode in their own way, and the size is measured on a line made for it.
    """

    def __init__(self, inner: Any, meter: SinkMeter, dead_letters: bool = False) -> None:
        self.inner = inner = as_sink(inner)
        self.meter = meter
        self.dead_letters = dead_letters
        self.name = inner.name
        self.accepts = inner.accepts  # type: ignore[misc]
        retry = getattr(inner, "retry", None)
        if isinstance(retry, Retry) and not dead_letters:
            inner.retry = CountingRetry.around(retry, meter.retried)  # type: ignore[attr-defined]
        self.encoded = _Fragment is not None and type(inner) is JsonLinesSink

    @property
    def local(self) -> bool:
        return self.inner.local

    def write_batch(self, batch: Batch) -> None:
        if self.dead_letters:
            self.inner.write_batch(batch)
            self.meter.dead_lettered(len(batch))
            return
        labels: list[Labeled] = batch.items
        if self.encoded:  # each line made once, here: the file sink writes it as it is
            encoded = [dumps(labeled.item.to_dict() if labeled.item.__class__ is Change
                             else labeled.item) for labeled in labels]
            size = sum(map(len, encoded)) + len(encoded)  # and a newline each
            items: list[Any] = [_Fragment(one) for one in encoded]
        else:
            items = [labeled.item for labeled in labels]
        started = time.monotonic()
        try:
            self.inner.write_batch(Batch(items, batch.positions))
        except BaseException:
            self.meter.failed_batch(time.monotonic() - started)
            raise
        seconds = time.monotonic() - started
        if not self.encoded:
            size = sum(len(dumps_line(jsonable(item))) for item in items)
        self.meter.delivered_batch(labels, seconds, size)

    def interrupt(self) -> None:
        self.inner.interrupt()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.meter.close()


@dataclass(frozen=True)
class CountingRetry(Retry):
    """A `Retry` that calls ``on_wait`` whenever a wait is asked of it (one retry)."""

    on_wait: Callable[[], None] = lambda: None

    @classmethod
    def around(cls, retry: Retry, on_wait: Callable[[], None]) -> CountingRetry:
        return cls(retry.initial, retry.maximum, retry.attempts, on_wait)

    def delay(self, failures: int) -> float:
        self.on_wait()
        return super().delay(failures)


class MeasuredOutput(Output):
    """The pipeline's output, measured where the feed runs: changes read, the lag, activity.

    ``pending`` holds, per change put and not yet confirmed, its commit time (a datetime), or
    when it was read (a float) for items without one; confirmations come in feed order, so its
    first entry is the oldest change not delivered yet. `put` runs once per change: it keeps
    to an append and two attribute reads.
    """

    def __init__(self, inner: Output, on_open: Callable[[], None] = lambda: None) -> None:
        self.inner = inner
        self.on_open = on_open
        self.pending: collections.deque[Any] = collections.deque()
        self.last_activity = 0.0
        """Monotonic time of the last idle tick: the source is answering."""
        self.last_snapshot_put = 0.0

    @property
    def read(self) -> int:
        """Changes read so far in this run."""
        return self.handled + len(self.pending)

    def open(self) -> None:
        inner = self.inner
        inner.confirm = self._confirm
        inner.open()
        inner_put, append, now, monotonic = inner.put, self.pending.append, time.time, (
            time.monotonic)

        def put(change: Any) -> None:
            append(getattr(change, "committed_at", None) or now())
            if getattr(change, "snapshot", False):
                self.last_snapshot_put = monotonic()
            inner_put(change)

        self.put = put  # type: ignore[method-assign]
        self.last_activity = monotonic()
        self.on_open()  # after the pipeline forked its workers: threads may start now

    def _confirm(self, position: Any, count: int) -> None:
        popleft = self.pending.popleft
        for _ in range(min(count, len(self.pending))):
            popleft()
        self.confirm(position, count)

    def idle(self) -> None:
        self.last_activity = time.monotonic()
        self.inner.idle()

    def finish(self) -> None:
        self.inner.finish()

    def close(self, clean: bool) -> None:
        self.inner.close(clean)

    def lag_seconds(self) -> float:
        """Seconds since the commit of the oldest change not delivered yet (0: none waits)."""
        try:
            oldest = self.pending[0]
        except IndexError:
            return 0.0
        since = oldest if isinstance(oldest, float) else oldest.timestamp()
        return max(0.0, time.time() - since)


__all__ = ["LATENCY_BUCKETS", "CountingRetry", "Labeled", "MeasuredOutput", "MeasuredSink",
           "SinkMeter", "Labeling"]
