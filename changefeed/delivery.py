"""Delivery: the loop every reader of a feed goes through.

`bounded()` ends a run (limit, deadline, idle timeout, stop request): `ChangeFeed.changes()`
reads through it, and so does `deliver()`, which takes the changes to an `Output`
(``changefeed run``'s `LineOutput`, a pipeline, `ChangeFeed.run_forever`'s queue) and
acknowledges what the output confirmed: in order, throttled by ``ack_interval``, the last of it
before the stream closes (the backend tells its server with its closing status). A failing feed
loses nothing delivered; a reader gone away (EPIPE) ends the run with what it did not take
unacknowledged. This module knows a feed only as the `Feed` protocol: it sits below the feed.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Protocol, cast

from changefeed._speedups import Lines
from changefeed.change import Change, Position
from changefeed.errors import ChangefeedError, PipelineError

log = logging.getLogger("changefeed")

FLUSH_BYTES = 256 * 1024
"""While busy, `LineOutput` flushes (and confirms what it wrote) per this many bytes."""
PROGRESS_SECONDS = 5.0
WAIT_STEP = 0.2
"""Seconds between calls of ``feed.keep_alive()`` while an output waits for its sink."""
STOP_GRACE = 3.0
"""Once a stop is requested, how long a sink still gets to confirm what it was given."""


@dataclass
class FeedStats:
    """Counters a feed keeps while it runs, for progress and lag reports."""

    changes: int = 0
    reconnects: int = 0
    last: Change | None = None
    """The last change streamed (prefeed items excluded)."""
    lag_bytes: int | None = None
    """How far the source's log is ahead of what the feed received, where the backend knows."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def last_position(self) -> Position:
        return getattr(self.last, "position", None)

    @property
    def last_committed_at(self) -> datetime | None:
        return getattr(self.last, "committed_at", None)


class Feed(Protocol):
    """What delivery reads and acknowledges, and a `Pipeline` stops: `changefeed.feed.ChangeFeed`
    is one."""

    stopping: bool
    stats: FeedStats

    @property
    def caught_up(self) -> bool: ...

    def read(self) -> Generator[Any, None, None]: ...

    def ack(self, position: Position) -> None: ...

    def keep_alive(self) -> None: ...

    def close(self) -> None: ...

    def stop(self) -> None: ...


class StopTimeout(Exception):
    """A stop request ended the wait for the output: what it did not confirm is left behind."""


class Output:
    """Where `deliver()` puts changes. Subclasses implement `put`, and as needed the rest.

    The loop sets `confirm` before `open()`; the output calls ``confirm(position, count)``
    once ``count`` more changes are delivered, ``position`` being the last of them. It must
    confirm in feed order: a confirmed position implies every earlier one.
    """

    confirm: Callable[[Position, int], None]
    handled = 0
    """Changes confirmed so far in the current run (counted by the loop)."""

    def open(self) -> None:
        """Called before the feed connects (a pipeline forks its worker processes here)."""

    def put(self, change: Any) -> None:
        """Take the next change (or prefeed item, message, snapshot marker)."""
        raise NotImplementedError

    def idle(self) -> None:
        """The source has nothing more at hand right now: deliver what waits, if sensible."""

    def finish(self) -> None:
        """Deliver everything taken and wait until it is confirmed (or raise `StopTimeout`
        once a stop request has waited long enough)."""

    def close(self, clean: bool) -> None:
        """Release what the output holds; ``clean`` is False after a failure or a stop that
        gave up waiting (then do not wait for anything)."""


@dataclass
class Delivered:
    """What a `deliver()` run did."""

    count: int = 0
    """Changes delivered and confirmed (handled, for a pipeline: delivered, dropped by a stage
    or dead-lettered)."""
    reader_gone: bool = False
    """The reader of the output went away (EPIPE); what it did not take is not acknowledged."""


class ThrottledAcks:
    """Acknowledges the latest delivered position of a feed, at most every ``interval`` seconds.

    A file checkpoint fsyncs on each acknowledgement, and under load output is confirmed
    hundreds of times a second; acknowledging less often caps that cost, and a crash then
    repeats at most ``interval`` seconds of output, never loses any.
    """

    __slots__ = ("feed", "interval", "pending", "last")

    def __init__(self, feed: Feed, interval: float) -> None:
        self.feed = feed
        self.interval = interval
        self.pending: Position = None
        self.last = 0.0

    def delivered(self, position: Position, final: bool = False) -> None:
        """Note ``position`` as delivered (None: nothing new), then acknowledge the latest
        delivered position if ``interval`` has passed since the last acknowledgement or
        ``final`` is set."""
        if position is not None:
            self.pending = position
        if self.pending is None:
            return
        now = time.monotonic()
        if final or now - self.last >= self.interval:
            self.feed.ack(self.pending)
            self.pending = None
            self.last = now


class Progress:
    """Every `PROGRESS_SECONDS` while busy: changes so far, rate, and lag behind the source;
    and a last line with the total. Logged at INFO on the ``changefeed`` logger."""

    def __init__(self, feed: Feed, quiet: bool = False) -> None:
        self.feed = feed
        self.quiet = quiet
        self.started = self.last = time.monotonic()
        self.last_count = 0

    def maybe_report(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and count != self.last_count:
            self.report(count)

    def report(self, count: int, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        stats = self.feed.stats
        if final:
            elapsed = max(now - self.started, 1e-9)
            log.info("stopped after %s changes (%.0f/s on average)", f"{count:,}", count / elapsed)
            return
        rate = (count - self.last_count) / max(now - self.last, 1e-9)
        lag = []
        if stats.last_committed_at is not None:
            seconds = time.time() - stats.last_committed_at.timestamp()
            lag.append(f"{max(seconds, 0):.1f} s")
        if stats.lag_bytes is not None:
            lag.append(f"{stats.lag_bytes:,} bytes of WAL")
        log.info(
            "%s changes, %s/s, lag %s", f"{count:,}", f"{rate:,.0f}", " / ".join(lag) or "unknown"
        )
        self.last, self.last_count = now, count


def bounded(
    feed: Feed,
    stream: Generator[Any, None, None],
    *,
    limit: int | None = None,
    timeout: float | None = None,
    idle_timeout: float | None = None,
    ticks: bool = False,
    close: bool = False,
) -> Generator[Any, None, None]:
    """The items of ``stream`` (``feed.read()``) until ``limit`` of them were read, ``timeout``
    seconds passed, no change came for ``idle_timeout`` seconds while the feed was caught up
    with its source (``feed.caught_up``: not reconnecting, not behind), or ``feed.stop()`` was
    called.

    This is where the ends of every read of a feed are enforced, each time after an item was
    handled and before the next is read; a batch of lines counts as the changes it holds (and
    is cut at ``limit``). ``ticks`` also yields the stream's None ticks.
    ``close`` closes the stream at the end; `deliver` closes it itself, after acknowledging.
    """
    monotonic = time.monotonic
    deadline = monotonic() + timeout if timeout is not None else None
    read = read_at_last_tick = 0
    idle_since = monotonic()
    try:
        if limit is not None and limit <= 0:
            return
        # The hot loop: one iteration per change.
        for item in stream:
            if item is not None:
                if item.__class__ is Lines:  # several changes (see `ChangeFeed.prefer_lines`)
                    if limit is not None and read + item.count > limit:
                        item = item.head(limit - read)
                    read += item.count - 1
                yield item
                read += 1
                if read == limit or feed.stopping:
                    return
                if deadline is not None and monotonic() >= deadline:
                    return
                continue
            if ticks:
                yield None
            now = monotonic()
            if read != read_at_last_tick:
                read_at_last_tick, idle_since = read, now
            elif idle_timeout is not None and not getattr(feed, "caught_up", True):
                idle_since = now  # quiet, but not caught up: that is no idleness
            if feed.stopping or (deadline is not None and now >= deadline) or (
                idle_timeout is not None and now - idle_since >= idle_timeout
            ):
                return
    finally:
        if close:
            stream.close()


def deliver(
    feed: Feed,
    output: Output,
    *,
    limit: int | None = None,
    idle_timeout: float | None = None,
    timeout: float | None = None,
    ack_interval: float = 0.0,
    progress: Progress | None = None,
) -> Delivered:
    """Take ``feed``'s changes to ``output`` until the feed ends or `bounded` ends the run;
    acknowledge what ``output`` confirmed. Raises what the feed or the output raised, after
    acknowledging what was confirmed."""
    result = Delivered()
    acks = ThrottledAcks(feed, ack_interval)
    delivered = acks.delivered

    def confirm(position: Position, count: int) -> None:
        output.handled += count
        delivered(position)
        if progress is not None:
            progress.maybe_report(output.handled)

    output.confirm = confirm
    output.handled = 0
    output.open()
    put = output.put
    clean = False
    stream = feed.read()
    items = bounded(feed, stream, limit=limit, timeout=timeout, idle_timeout=idle_timeout,
                    ticks=True)
    try:
        try:
            try:
                # The hot loop: one iteration per change.
                for item in items:
                    if item is not None:
                        put(item)
                        continue
                    output.idle()
                    delivered(None)  # an acknowledgement held back by the interval goes now
                    if progress is not None:
                        progress.maybe_report(output.handled)
            except PipelineError:
                raise
            except ChangefeedError:
                output.finish()  # the feed failed, not the output: deliver what it gave
                raise
            output.finish()
            clean = True
        except StopTimeout:
            log.warning(
                "stopping: the output did not confirm what it was given in time; that is not"
                " acknowledged and comes again on the next run"
            )
        except PipelineError as exc:
            if not isinstance(exc.__cause__, BrokenPipeError):
                raise
            result.reader_gone = True  # a sink writing to stdout
        except BrokenPipeError:
            result.reader_gone = True
    finally:
        if not result.reader_gone:
            acks.delivered(None, final=True)  # before the stream closes: with its last status
        items.close()
        stream.close()
        output.close(clean)
        feed.close()  # an acknowledgement made after the stream ended reaches the server here
        result.count = output.handled
    if progress is not None and not result.reader_gone:
        progress.report(result.count, final=True)
    return result


class SinkWait:
    """How an output waits for a sink that works elsewhere (a thread, processes): calling
    ``feed.keep_alive()`` every `WAIT_STEP` seconds (PostgreSQL's walsender expects answers),
    and once ``feed.stopping`` for `STOP_GRACE` seconds more at most (`StopTimeout`)."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.stop_deadline: float | None = None

    def until(self, done: Callable[[float], bool]) -> None:
        """Return once ``done(seconds)``, which may block that long for news from the sink,
        says the wait is over; raise `StopTimeout` once a stop request has waited long enough
        (what the sink did not confirm is not acknowledged, and comes again on the next run)."""
        while not done(WAIT_STEP):
            self.feed.keep_alive()
            if self.feed.stopping:
                now = time.monotonic()
                if self.stop_deadline is None:
                    self.stop_deadline = now + STOP_GRACE
                elif now >= self.stop_deadline:
                    raise StopTimeout


class LineOutput(Output):
    """Encoded lines into a binary file (stdout): the zero-stage fast path of ``changefeed run``.

    Each line goes straight into the file's own buffer and is freed at once (keeping a few
    thousand encoded lines alive until a flush made every encoding four times slower: glibc
    returning freed memory to the system and asking for it again). The buffer is flushed when
    the source goes idle and per `FLUSH_BYTES`; a flush confirms the lines written before it.
    A batch of lines the feed wrote itself (`ChangeFeed.prefer_lines`) is written as it is.
    ``keep``: a `Change` it returns False for is handled without a line (the feed's ``where``
    on what the feed could not judge itself).
    """

    def __init__(
        self, out: BinaryIO, encode: Callable[[Any], bytes], flush_bytes: int = FLUSH_BYTES,
        keep: Callable[[Change], bool] | None = None,
    ) -> None:
        self.out = out
        self.encode = encode
        self.flush_bytes = flush_bytes
        self.keep = keep

    def open(self) -> None:
        # `put` runs once per change: as a closure over locals it costs a third of what a
        # method reading the same state from ``self`` costs (measured with decode_cost.py).
        out, write, encode, flush_bytes = self.out, self.out.write, self.encode, self.flush_bytes
        confirm = self.confirm
        keep = self.keep
        if keep is not None:
            encode_any = encode

            def encode(change: Any) -> bytes:
                if change.__class__ is Change:
                    try:
                        kept = keep(change)
                    except BaseException:
                        flush()  # what came before is delivered, as a pipeline's sink does
                        raise
                    if not kept:
                        return b""
                return encode_any(change)

        size = written = 0
        last: Any = None

        def put(change: Any) -> None:
            nonlocal size, written, last
            if change.__class__ is Lines:
                size += write(change)
                written += change.count
            else:
                size += write(encode(change))
                written += 1
            last = change
            if size >= flush_bytes:
                flush()

        def flush() -> None:
            """Flush the file, then confirm what was written before."""
            nonlocal size, written
            out.flush()
            size = 0
            if written:
                count, written = written, 0
                confirm(last.position, count)

        self.put = put  # type: ignore[method-assign]
        self.idle = self.finish = flush  # type: ignore[method-assign]

    def close(self, clean: bool) -> None:
        """The file stays open: it belongs to the caller."""


def buffered_stdout() -> BinaryIO:
    """Binary stdout with a buffer, also under ``PYTHONUNBUFFERED`` / ``python -u`` (which make
    ``sys.stdout.buffer`` a raw file: one system call per line)."""
    stdout = sys.stdout.buffer
    if isinstance(stdout, io.BufferedIOBase):
        return cast(BinaryIO, stdout)  # it was one before the check narrowed it
    return io.BufferedWriter(io.FileIO(sys.stdout.fileno(), "wb", closefd=False))


def silence_stdout() -> None:
    """Point stdout at /dev/null after its reader went away, so that the interpreter's own
    flush at exit does not fail (and print) on the broken pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


__all__ = [
    "FLUSH_BYTES",
    "Delivered",
    "Feed",
    "FeedStats",
    "LineOutput",
    "Output",
    "Progress",
    "STOP_GRACE",
    "SinkWait",
    "StopTimeout",
    "ThrottledAcks",
    "bounded",
    "buffered_stdout",
    "deliver",
    "silence_stdout",
]
