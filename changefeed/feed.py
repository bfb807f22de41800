"""The `ChangeFeed` node: prefeed, then stream, with the reconnect and resume policy of all
backends.

`ChangeFeed.read()` replays the prefeed, then streams the backend's `run_changefeed()` (changes
after the acknowledged position, and None ticks when idle). A failure the backend's
`is_transient()` accepts is followed by a reconnect after a backoff with jitter (`Retry`);
any other, and any failure before the backend first reached its server (`mark_connected()`: a
wrong URL is said at once, not retried forever), ends the feed, a driver's error wrapped in
`PermanentBackendError`. Every reader (``for change in feed``, `changes()`, `run_forever()`,
the CLI, a pipeline) reads through `changefeed.delivery`, which enforces the ends of a run.
Delivery is at least once: a consumer acknowledges with `ack()` what it delivered.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar, cast

from multipipes import Node

from changefeed._speedups import Lines
from changefeed.change import ALL, Change, Operation, Position
from changefeed.checkpoint import CheckpointStore, MemoryCheckpoint
from changefeed.delivery import FeedStats, Output, bounded, deliver
from changefeed.errors import (
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    TransientBackendError,
    first_line,
)
from changefeed.retry import Retry

log = logging.getLogger("changefeed")

F = TypeVar("F", bound="ChangeFeed")

RECONNECT_TICK = 0.1
"""While it waits to reconnect, a feed ticks this often (its reader may end the wait)."""


class ChangeFeed(Node):
    """A real-time feed of the inserts, updates and deletes of one table or collection.

    It is a `multipipes.Node`: put it in a ``Pipeline`` and its changes go to ``outqueue``. It is
    also an iterable: ``for change in feed`` runs the same code in the calling process. As a
    context manager (``with get_changefeed(...) as feed:``) it is closed on leaving the block.

    Backends subclass it, implement `run_changefeed()` and `is_transient()`, call
    `mark_connected()` once they reached their server, and register with
    `changefeed.registry.register_backend`.

    Args:
        table: the table or collection to watch (backends accept qualified names).
        operation: the operations to emit, e.g. ``ChangeFeed.INSERT | ChangeFeed.UPDATE``.
        prefeed: an iterable replayed before the stream, or ``"snapshot"`` for a consistent
            read of the table handed over to the stream without gap or duplicate (backends
            that support it).
        connection: the backend's connection or connection string.
        checkpoint: where acknowledged positions are kept (default: in memory).
        retry: the reconnect policy.
        name: identifies the feed in the checkpoint store (default: the table name).
    """

    INSERT = Operation.INSERT
    DELETE = Operation.DELETE
    UPDATE = Operation.UPDATE
    TRUNCATE = Operation.TRUNCATE
    ALL = ALL

    supports_snapshot = False
    """Backends that can take a consistent snapshot set this to True."""

    resume = "checkpoint"
    """How the backend resumes after a restart: ``"server"`` (the server keeps the acknowledged
    position, as a PostgreSQL slot does), ``"checkpoint"`` (only from the checkpoint store's
    position, as MongoDB's resume token), or ``"resync"`` (it cannot resume and re-reads)."""

    def __init__(
        self,
        table: str,
        operation: int = ALL,
        *,
        prefeed: Iterable[Any] | str | None = None,
        connection: Any = None,
        checkpoint: CheckpointStore | None = None,
        retry: Retry | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name="changefeed")
        self.table = table
        self.operation = Operation(operation)
        if not self.operation:
            raise ConfigurationError("the feed watches no operation: give INSERT, UPDATE or DELETE")
        if isinstance(prefeed, str) and prefeed != "snapshot":
            raise ConfigurationError(f"unknown prefeed {prefeed!r}: give an iterable or 'snapshot'")
        if prefeed == "snapshot" and not self.supports_snapshot:
            raise ConfigurationError(f"{type(self).__name__} cannot take a snapshot prefeed")
        self.prefeed = prefeed if prefeed is not None else []
        self.connection = connection
        self.checkpoint = checkpoint if checkpoint is not None else MemoryCheckpoint()
        self.retry = retry if retry is not None else Retry()
        self.feed_id = name or table
        self.stats = FeedStats()
        self._acknowledged_position: Position = self.checkpoint.load(self.feed_id)
        self.connected_once = False
        """Whether the backend ever reached its server (see `mark_connected`)."""
        self.stopping = False
        """Whether `stop()` was called since the current `read()` began (read it, do not set
        it): the delivery loop ends the run on it, and an output waiting on its sink gives up."""
        self.reconnecting = False
        """Whether the feed lost its source and has not streamed again since."""

    @property
    def acknowledged(self) -> Position:
        """The last acknowledged position: loaded from the checkpoint store at start, moved by
        `ack()` alone. A feed resumes after it; None means from the start (or the server's
        slot)."""
        return self._acknowledged_position

    # -- what a backend implements -------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        """Stream the changes after `acknowledged`, forever.

        Yield only changes whose operation is in ``self.operation``, and None as a tick when
        nothing more is at hand right now, at least once a second while nothing happens.
        Raise on failure; the caller decides, through `is_transient()`, whether to call again.
        """
        raise NotImplementedError

    def is_transient(self, exc: BaseException) -> bool:
        """Whether reconnecting may cure ``exc``. Backends refine this pure predicate."""
        from changefeed.errors import TransientBackendError

        return isinstance(exc, TransientBackendError)

    def on_acknowledge(self, position: Position) -> None:
        """Called after ``position`` was acknowledged; backends note it for their server here.

        It must not block or connect: the backend tells its server from its stream loop,
        `keep_alive()` or `close()`.
        """

    def close(self) -> None:
        """Release the backend's connections. The feed may be iterated again afterwards."""

    def prefer_lines(self, fmt: str, model: Any = None, where: list[Any] | None = None) -> bool:
        """Ask the feed to hand out row changes as their output lines of format ``fmt`` (with
        the delta ``model``), batched (`changefeed._speedups.Lines`), instead of `Change`
        objects, where the backend can write them itself; True if it may. For a reader that
        writes those lines and needs nothing else of a change (``changefeed run`` without
        stages, through `LineOutput`), which must still take any other item as it comes.

        ``where`` (a Snorky filter, checked): a change whose row does not match gets no line
        but counts in its batch, as a change handled; one the backend cannot judge comes as
        its `Change`, for the reader's own filter. Default: False (the PostgreSQL backend's
        compiled path says yes)."""
        return False

    def source_caught_up(self) -> bool:
        """Whether the backend has handed out everything its source had when it last went
        quiet. Default: a tick says so; backends that can tell better override this (PostgreSQL
        compares the stream with the server's WAL)."""
        return True

    @property
    def caught_up(self) -> bool:
        """Whether the feed is idle because it is caught up with its source, not because it
        lost it or lags behind it: an idle timeout (``--idle-timeout``) counts only then."""
        return not self.reconnecting and self.source_caught_up()

    def __enter__(self: F) -> F:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Leaving ``with feed:`` closes it, telling the server what was acknowledged."""
        self.close()

    def keep_alive(self) -> None:
        """Keep the source's connection healthy while the consumer is busy elsewhere.

        A consumer that holds on to the stream without asking for changes (a slow or retrying
        sink) calls this at least every second or so from the thread that iterates the feed.
        It must return quickly and hand out nothing; a backend whose server expects replies
        (PostgreSQL's walsender keepalives) answers them here. Default: nothing to do.
        """

    def wait_for_source(self, timeout: float | None, fd: int) -> bool | None:
        """Wait at most ``timeout`` seconds (None: no limit) until the source has more to hand
        out or the file descriptor ``fd`` is readable, whichever comes first: True if the
        source has more, False otherwise. For a consumer between two reads that waits for
        its own workers (a pipeline's processes, on their confirmations' pipe) but would
        rather read on if the source sends first. Called from the thread that iterates the
        feed, never while a change is being handed out. Default: None, the backend cannot
        tell (the caller waits on ``fd`` alone)."""
        return None

    # -- what every feed shares ----------------------------------------------------------------

    def mark_connected(self) -> None:
        """Backends call this once they reached their server (connected, checked the table);
        handing out a change or a tick counts as well.

        Until then every failure ends the feed instead of being retried: a wrong URL or a
        server that is down is said at once."""
        self.connected_once = True

    def snapshot_changes(
        self, rows: Iterable[Any], make: Callable[[Any, int, bool], Any], noun: str = "rows"
    ) -> Iterator[Any]:
        """Snapshot changes (or markers) made by ``make(row, number, last)`` from ``rows``, read
        one row ahead so the last can say the snapshot is done; logs its start and size."""
        log.info("snapshot of %s: reading", self.table)
        count = 0
        previous: Any = None
        for row in rows:
            if count:
                yield make(previous, count, False)
            count += 1
            previous = row
        if count:
            yield make(previous, count, True)
        log.info("snapshot of %s: %s %s", self.table, f"{count:,}", noun)

    def ack(self, position: Position) -> None:
        """Acknowledge that every change up to ``position`` was delivered.

        The position is saved to the checkpoint store and passed to the backend, which may then
        let the server discard what came before it. A feed resumes after the last acknowledged
        position, so unacknowledged changes are delivered again after a failure.
        """
        if position is None:
            return
        self._acknowledged_position = position
        self.checkpoint.save(self.feed_id, position)
        self.on_acknowledge(position)

    def stop(self) -> None:
        """Ask a running read of the feed (`changes()`, `deliver()`) to end after the change at
        hand, or at the next tick (safe from a signal handler)."""
        self.stopping = True

    def read(self) -> Generator[Any, None, None]:
        """Yield the prefeed, then the stream's changes, and None as a tick whenever nothing
        more is at hand (the stream is idle, or the feed waits to reconnect); reconnect on
        transient errors.

        It ends only when the stream does: limits, deadlines, idle timeouts and stop requests
        are its reader's to enforce, and every reader goes through
        `changefeed.delivery.bounded`, which does (`changes()`, `deliver()`). Nothing is
        acknowledged here.
        """
        self.stopping = False
        stats = self.stats
        try:
            if not isinstance(self.prefeed, str):
                yield from self.prefeed
            failures = 0
            while True:
                streamed = stats.changes
                stream = self.run_changefeed()
                try:
                    # The hot loop: keep it lean, it runs once per change.
                    for change in stream:
                        if change is not None:
                            # A batch of lines (`prefer_lines`) holds several changes.
                            stats.changes += (cast(Any, change).count
                                              if change.__class__ is Lines else 1)
                            stats.last = change
                            yield change
                        else:
                            self.connected_once = True  # a tick: the backend is streaming
                            self.reconnecting = False
                            yield None
                    return
                except Exception as exc:
                    if stats.changes > streamed:  # it streamed: it was connected, and this
                        self.connected_once = True  # failure is the first of a new series
                        failures = 0
                    if not (self.connected_once and self.is_transient(exc)):
                        error = _permanent(exc)
                        if error is exc:
                            raise
                        raise error from exc
                    failures += 1
                    delay = self._reconnect_delay(exc, failures)
                    self.reconnecting = True
                finally:
                    close_stream = getattr(stream, "close", None)
                    if close_stream is not None:  # a generator: run its clean-up now
                        close_stream()
                    self.close()
                yield from _ticking_sleep(delay)
        finally:
            self.close()

    def _reconnect_delay(self, exc: BaseException, failures: int) -> float:
        """Seconds to wait before reconnecting after ``exc``, the ``failures``-th failure in a
        row; past the retry's bound the error that ends the feed."""
        if self.retry.exhausted(failures):
            raise PermanentBackendError(
                f"gave up after {failures - 1} reconnect attempts; last error: {exc}"
            ) from exc
        delay = self.retry.delay(failures)
        log.warning("connection lost (%s); reconnecting in %.1f s", first_line(exc), delay)
        self.stats.reconnects += 1
        return delay

    def changes(
        self,
        *,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        limit: int | None = None,
        ticks: bool = False,
    ) -> Generator[Any, None, None]:
        """Yield the prefeed, then the stream, reconnecting on transient errors, until a bound
        (all optional: by default forever) or a `stop()`; see `changefeed.delivery.bounded`.

        Args:
            timeout: stop after this many seconds in all.
            idle_timeout: stop once no change arrived for this many seconds.
            limit: stop after this many changes (prefeed included).
            ticks: also yield None whenever the backend has nothing more at hand right now,
                so a consumer can flush buffered output exactly when the stream goes idle.

        Nothing is acknowledged here: call `ack()` once a change is delivered.
        """
        return bounded(self, self.read(), limit=limit, timeout=timeout,
                       idle_timeout=idle_timeout, ticks=ticks, close=True)

    def __iter__(self) -> Iterator[Change]:
        """Iterate forever, acknowledging each change when the next one is asked for."""
        for change in self.changes():
            yield change
            self.ack(getattr(change, "position", None))  # the consumer is done with it

    def run_forever(self) -> None:
        """The multipipes entry point: put every change on ``outqueue``, and acknowledge each
        once the next node has taken it off the queue (`QueueOutput`).

        That node may still lose a change it took (it dies while handling it); pipelines that
        need acknowledgement after the sink use `changefeed.pipelines` instead.
        """
        deliver(self, QueueOutput(self.outqueue))


class QueueOutput(Output):
    """Changes onto a multiprocessing queue (a multipipes node's ``outqueue``), each confirmed
    once the consumer has taken it off the queue.

    ``queue.qsize()`` says how many of the changes put are still waiting, so every change
    before those was taken. On macOS, where a multiprocessing queue cannot tell its size
    (``NotImplementedError``), a change counts as delivered once it is on the queue.
    """

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.waiting: collections.deque[Position] = collections.deque()
        """The positions of the changes on the queue, oldest first, not yet known taken."""

    def put(self, change: Any) -> None:
        self.queue.put(change)
        self.waiting.append(getattr(change, "position", None))
        self._confirm_taken()

    def idle(self) -> None:
        self._confirm_taken()

    def finish(self) -> None:
        """Confirm what was taken; what waits on the queue is not acknowledged (it comes
        again on the next run)."""
        self._confirm_taken()

    def _confirm_taken(self) -> None:
        try:
            on_queue = self.queue.qsize()
        except NotImplementedError:  # macOS
            on_queue = 0
        taken = len(self.waiting) - on_queue
        if taken <= 0:
            return
        last: Position = None
        for _ in range(taken):
            position = self.waiting.popleft()
            if position is not None:
                last = position
        self.confirm(last, taken)


def _ticking_sleep(seconds: float) -> Iterator[None]:
    """Sleep ``seconds``, yielding None every `RECONNECT_TICK` seconds and at the end, so that
    the reader can end the wait (a deadline, a stop request)."""
    end = time.monotonic() + seconds
    while (remaining := end - time.monotonic()) > 0:
        time.sleep(min(RECONNECT_TICK, remaining))
        yield None


def _permanent(exc: Exception) -> ChangefeedError:
    """``exc`` as the error that ends a feed: changefeed's own as it is (a transient one, seen
    before the server was ever reached, made permanent), a driver's wrapped."""
    if isinstance(exc, TransientBackendError):
        return PermanentBackendError(exc.message)
    if isinstance(exc, ChangefeedError):
        return exc
    return PermanentBackendError(f"{type(exc).__name__}: {exc}")
