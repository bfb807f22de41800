"""Sinks: where a pipeline delivers items, and what "delivered" means.

A sink is either

* a `Sink`: ``write_batch(batch)`` receives a `Batch` and returns only once the batch is
  delivered (written and flushed, answered 2xx, added to the stream, confirmed by Kafka); or
* a plain callable, called once per item (or once per list after a ``batch()`` stage).

Returning normally is the confirmation: only then does the pipeline acknowledge the positions of
the batch's changes. Raising is a failure (see the pipeline's failure policy). A sink is called
from one thread only, except `Sink.interrupt`. `Sink` declares the rest of the contract (what a
sink accepts, whether it is local, interrupt, close) with defaults, and every built-in sink is
one. Sinks open their connections and files on first use, so that each process of a
multi-process pipeline opens its own.

Built-ins: `JsonLinesSink`, `CallbackSink`, `WebhookSink` and `SnorkySink`
(``changefeed.pipelines.sinks.http``), `RedisStreamSink` (``changefeed.pipelines.sinks.redis``)
and `KafkaSink` (``changefeed.pipelines.sinks.kafka``). ``changefeed.pipelines.sinks.spec``
makes one from a ``--sink`` value (`sink_from_spec`).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

from changefeed._speedups import Lines
from changefeed.change import Change, Position, Truncate
from changefeed.errors import PipelineError
from changefeed.formats.codec import dumps_line
from changefeed.linefiles import (
    append_whole,
    cut_partial_line,
    describe_os_error,
    is_regular_file,
)
from changefeed.retry import Retry

log = logging.getLogger("changefeed.pipelines")
T = TypeVar("T")


class SinkInterrupted(PipelineError):
    """A sink gave up a batch because the pipeline is stopping: neither delivered nor failed."""


@dataclass(frozen=True)
class Batch:
    """Items to deliver together, each with the position of the change it came from."""

    items: list[Any]
    positions: list[Position]
    """``positions[i]`` is the position of the change ``items[i]`` was made from."""

    @property
    def first(self) -> Position:
        return self.positions[0] if self.positions else None

    @property
    def last(self) -> Position:
        return self.positions[-1] if self.positions else None

    def __len__(self) -> int:
        return len(self.items)


@runtime_checkable
class BatchSink(Protocol):
    """Any object with ``write_batch`` is given whole batches (a `Sink` is one; see there for
    the contract)."""

    def write_batch(self, batch: Batch) -> None:
        """Deliver ``batch``; return only once it is delivered, raise if it cannot be."""


Accepts = Literal["any", "changes", "deltas"]


class Sink:
    """The sink contract, with the defaults of a sink that needs none of its options.

    Subclasses implement `write_batch` and override what differs from the defaults.
    """

    name: str
    """How logs and errors name the sink (without secrets); set by each sink."""

    accepts: ClassVar[Accepts] = "any"
    """The items it takes: ``"changes"`` (it formats them itself, as a Redis stream or a Kafka
    topic does), ``"deltas"`` (Snorky), or ``"any"`` JSON-able item, so that the CLI's
    ``--format`` adds the stage that makes them."""

    @property
    def local(self) -> bool:
        """Whether it never waits on anything but the local disk (a file). Such a sink is called
        in the feed's own thread, which saves the cost of a hand-over between threads."""
        return False

    def write_batch(self, batch: Batch) -> None:
        """Deliver ``batch``; return only once it is delivered, raise if it cannot be."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """Give up the batch being delivered soon, by raising `SinkInterrupted` (the batch is
        not confirmed, and comes again on the next run). The pipeline calls it from another
        thread when it stops; a sink that never waits long has nothing to do."""

    def close(self) -> None:
        """Release connections and files; called once, in the process that used the sink."""


def jsonable(item: Any) -> Any:
    """``item`` ready for JSON: a `Change` or `Truncate` as its ``to_dict()``, anything else
    as it is."""
    return item.to_dict() if isinstance(item, (Change, Truncate)) else item


class JsonLine:
    """An item already written as its JSON line (``line``: the bytes of ``dumps_line(item)``,
    newline included), made by a format stage for a sink that writes lines (``takes_lines``):
    the sink writes it as it is, and the bytes cross a process boundary far cheaper than the
    item would."""

    __slots__ = ("line",)

    def __init__(self, line: bytes) -> None:
        self.line = line

    def __eq__(self, other: object) -> bool:
        return other.__class__ is JsonLine and self.line == other.line

    def __hash__(self) -> int:
        return hash(self.line)

    def __repr__(self) -> str:
        return f"JsonLine({self.line!r})"

    def __reduce__(self) -> tuple[type, tuple[bytes]]:
        return JsonLine, (self.line,)


class SinkUnavailable(PipelineError):
    """A sink that cannot take anything now, whatever the change: a full disk, a read-only file
    system, a receiver whose TLS certificate is refused. The run stops even with a dead-letter
    sink, since every change after would fail the same way (and be acknowledged unwritten)."""


class JsonLinesSink(Sink):
    """One JSON object per line to stdout (``"-"``), a file path, or an open binary file.

    A batch is written in one call and counts as delivered once written; with ``fsync=True``
    (files only) also once on disk. Changes are written as ``to_dict()``; put ``to_delta()``
    before the sink for Snorky deltas. A path is opened for appending.

    A file (a path, or stdout redirected to one) only ever holds whole lines
    (`changefeed.linefiles`): a batch is appended in full or not at all, and a partial last line
    that a killed run left is cut off when the file is opened. A write that fails (a full disk,
    a quota, a file-size limit, an I/O error) raises `SinkUnavailable` in one line.
    """

    takes_lines = True
    """It writes a `JsonLine` item as it is (a format stage may make them for it), and a
    batch of lines the feed wrote itself (`Lines`)."""

    def __init__(self, target: str | os.PathLike[str] | IO[bytes] = "-", *, fsync: bool = False):
        self.target = target
        self.fsync = fsync
        self._file: IO[bytes] | None = None
        self._fd: int | None = None
        self._regular = False
        self._owned = False
        self.shown = (os.fspath(target) if isinstance(target, (str, os.PathLike)) else "file")
        self.name = f"json_lines({self.shown})"

    @property
    def local(self) -> bool:
        """Whether it writes to a file on a local disk or a device such as /dev/null (not
        stdout, a pipe or a socket, whose reader may make a write wait)."""
        if not isinstance(self.target, (str, os.PathLike)) or self.target == "-":
            return False
        try:
            mode = os.stat(self.target).st_mode
        except OSError:
            return True  # created on first write: a regular file
        return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))

    def _open(self) -> None:
        """Open the target: a descriptor written with `append_whole` (a path, or stdout when it
        has one), else the file object given (written and flushed)."""
        if self._fd is not None or self._file is not None:
            return
        if self.target == "-":
            stdout = sys.stdout.buffer
            try:
                fd = stdout.fileno()
            except (AttributeError, OSError, ValueError):  # replaced (a test's capture)
                self._file = stdout
                return
            stdout.flush()  # what was printed before comes first
            self._fd, where = fd, "stdout"
        elif isinstance(self.target, (str, os.PathLike)):
            try:
                self._fd = os.open(self.target, os.O_RDWR | os.O_APPEND | os.O_CREAT
                                   | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                raise SinkUnavailable(
                    f"cannot open {self.shown}: {describe_os_error(exc)}") from exc
            self._owned = True
            where = self.shown
        else:
            self._file = self.target
            return
        self._regular = is_regular_file(self._fd)
        try:
            cut_partial_line(self._fd, where)
        except OSError as exc:
            raise SinkUnavailable(
                f"cannot repair the end of {where}: {describe_os_error(exc)}") from exc

    def write_batch(self, batch: Batch) -> None:
        self._open()
        # One write per batch, so appenders sharing a file never tear each other's lines. The
        # lines are copied into one buffer as they are made: holding them all until a join
        # made encoding several times slower (glibc malloc trimming and growing the heap).
        lines = bytearray()
        count = 0
        for item in batch.items:
            cls = item.__class__
            if cls is Lines:  # the feed's own lines, made for this sink (`prefer_lines`)
                lines += item
                count += item.count
                continue
            lines += item.line if cls is JsonLine else dumps_line(jsonable(item))
            count += 1
        if self._fd is None:
            file = self._file
            assert file is not None
            file.write(lines)
            file.flush()
            return
        try:
            append_whole(self._fd, lines, fsync=self.fsync and self._owned,
                         regular=self._regular)
        except BrokenPipeError:  # the reader of stdout went away: not a failure to report
            raise
        except OSError as exc:
            where = "stdout" if self.target == "-" else self.shown
            raise SinkUnavailable(
                f"cannot write {where}: {describe_os_error(exc)}; none of the batch's"
                f" {count} lines was kept"
            ) from exc

    def close(self) -> None:
        if self._owned and self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._file = None
        self._owned = False


class ItemsRejected(PipelineError):
    """A sink delivered a batch except some items, which it will never take however often they
    are sent (a webhook answering 413 to a single change): ``rejected`` holds their indexes in
    the batch. The pipeline sends their changes to the dead letters (then the batch counts as
    delivered), or fails without a dead-letter sink."""

    def __init__(self, message: str, rejected: list[int]) -> None:
        super().__init__(message)
        self.rejected = rejected

    def __reduce__(self) -> Any:
        return type(self), (self.message, self.rejected)


class Retryable(Exception):
    """Raised by an attempt given to `RemoteSink.retrying` that trying again may cure (a lost
    connection, an HTTP 503); its message says what happened, without secrets. ``after``: the
    seconds the server asked to wait (``Retry-After``), waited at least."""

    def __init__(self, message: str, after: float = 0.0) -> None:
        super().__init__(message)
        self.after = after


class RemoteSink(Sink):
    """What the sinks that talk to a server share: a client made on first use, in the process
    that delivers (a sink may cross to a spawned process without it), `interrupt`, and the
    retry loop (`retrying`)."""

    default_retry = Retry(initial=0.5, maximum=30.0, attempts=8)
    retry: Retry
    _client: Any = None
    _interrupted: threading.Event

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_interrupted": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._interrupted = threading.Event()

    @property
    def client(self) -> Any:
        """The server's client, opened on first use, in the process that delivers."""
        if self._client is None:
            self._client = self._open_client()
        return self._client

    def _open_client(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Close the client (a later batch opens a new one) and forget an interrupt."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._interrupted.clear()

    def interrupt(self) -> None:
        """Give up the batch being delivered (no further attempt or wait) and any later one,
        until `close()`. Safe from any thread; the pipeline calls it to stop."""
        self._interrupted.set()

    def retrying(self, attempt: Callable[[], T], where: str) -> T:
        """What ``attempt()`` returns, calling it again after each `Retryable` failure once
        ``self.retry``'s backoff has passed.

        Raises `PipelineError` (naming ``where``) past the retry's bound, and `SinkInterrupted`
        as soon as `interrupt()` is called (the batch is then neither delivered nor failed).
        """
        failures = 0
        while True:
            if self._interrupted.is_set():
                raise SinkInterrupted(f"{self.name}: stopped before the batch was delivered")
            try:
                return attempt()
            except Retryable as exc:
                failures += 1
                problem, cause = str(exc), exc.__cause__
                if self.retry.exhausted(failures):
                    raise PipelineError(
                        f"{where} failed {failures} times; last: {problem}"
                    ) from cause
                delay = max(self.retry.delay(failures), exc.after)
                log.warning("%s: %s; retrying in %.1f s", where, problem, delay)
                if self._interrupted.wait(delay):
                    raise SinkInterrupted(
                        f"{self.name}: stopped while retrying; last: {problem}"
                    ) from cause


class CallbackSink(Sink):
    """Deliver by calling ``callback``: once per item, or once per batch with ``batches=True``.

    The callback returning is the confirmation. With ``batches=True`` it receives the `Batch`
    (items and their positions), so it can, for example, write them in one transaction.
    """

    def __init__(self, callback: Callable[[Any], Any], *, batches: bool = False) -> None:
        self.callback = callback
        self.batches = batches
        self.name = f"callback({getattr(callback, '__name__', type(callback).__name__)})"

    def write_batch(self, batch: Batch) -> None:
        if self.batches:
            self.callback(batch)
        else:
            for item in batch.items:
                self.callback(item)


class _ForeignSink(Sink):
    """A sink that is not a `Sink`: an object with ``write_batch`` (and perhaps ``close``,
    ``interrupt``, ``local``), or a plain callable taking each item, or each batch's list of
    items after an explicit ``batch()``."""

    def __init__(self, target: Any, lists: bool) -> None:
        self.target = target
        self.name = str(getattr(target, "name", None) or getattr(
            target, "__name__", type(target).__name__
        ))
        self.batches = isinstance(target, BatchSink)
        self.lists = lists
        self.is_local = bool(getattr(target, "local", False))

    @property
    def local(self) -> bool:
        return self.is_local

    def write_batch(self, batch: Batch) -> None:
        if self.batches:
            self.target.write_batch(batch)
        elif self.lists:
            self.target(list(batch.items))
        else:
            for item in batch.items:
                self.target(item)

    def interrupt(self) -> None:
        interrupt = getattr(self.target, "interrupt", None)
        if interrupt is not None:
            interrupt()

    def close(self) -> None:
        close = getattr(self.target, "close", None)
        if close is not None:
            close()


def as_sink(target: Any, lists: bool = False) -> Sink:
    """``target`` as a `Sink`: itself if it is one, else wrapped (see `_ForeignSink`);
    ``lists``: a plain callable gets each batch's items as one list (after ``batch()``)."""
    if isinstance(target, Sink):
        return target
    if not (isinstance(target, BatchSink) or callable(target)):
        raise TypeError(f"{target!r} is not a sink: give a Sink, or a callable")
    return _ForeignSink(target, lists)


__all__ = [
    "Accepts", "Batch", "BatchSink", "CallbackSink", "ItemsRejected", "JsonLine", "JsonLinesSink",
    "RemoteSink", "Retryable", "Sink", "SinkInterrupted", "SinkUnavailable", "as_sink", "jsonable",
]
