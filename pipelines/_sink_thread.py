"""The sink thread of an in-process pipeline: the feed's thread hands batches over and reads on.

A slow or retrying sink called from the feed's thread would leave the source unanswered
(PostgreSQL's walsender, its shutdown, ``wal_sender_timeout``), and the backlog would grow while
batches stay small. So one thread runs the sink, one batch at a time in feed order (the
confirmations come back in order); while it works the next batch grows, and the feed's thread
waits only through `changefeed.delivery.SinkWait`. A sink that only writes a local file runs
inline instead: a hand-over between threads costs more than it saves there.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from changefeed.delivery import SinkWait
from changefeed.pipelines._steps import _Confirmed, _Entry, _SinkStep

log = logging.getLogger("changefeed.pipelines")

SLOW_SINK = 1.0
"""A sink that has held a batch this long is slow: at an idle moment the feed's thread then waits
for it (answering the source with keep_alive()) instead of reading on."""
CLOSE_WAIT = 10.0
"""How long the end of a run waits for the sink thread to close its sinks."""


class _SinkThread:
    """Runs ``sink_step.deliver`` in a thread of its own; ``confirm`` gets each result in order.

    Used from the feed's thread only (except `_run`, the sink thread); the sinks are called
    from the sink thread only, ``close()`` included, unless they all write local files
    (``inline``).
    """

    def __init__(
        self, sink_step: _SinkStep, feed: Any, confirm: Callable[[_Confirmed | None], None]
    ) -> None:
        self.sink_step = sink_step
        self.confirm = confirm
        self.in_flight = 0
        self.handed_at = 0.0
        self.waiting = SinkWait(feed)
        self.inline = all(
            sink.local for sink in (sink_step.sink, sink_step.dead_letter)
            if sink is not None
        )
        self._closing = threading.Lock()
        self._closed = False
        self._batches: queue.SimpleQueue[list[_Entry] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[_Confirmed | BaseException | None] = queue.SimpleQueue()
        # A daemon: a sink stuck in a request must not keep the process alive after a stop.
        self._thread = threading.Thread(target=self._run, name="changefeed-sink", daemon=True)
        if not self.inline:
            self._thread.start()

    # -- the sink thread -----------------------------------------------------------------------

    def _run(self) -> None:
        step = self.sink_step
        failure: BaseException | None = None
        try:
            while True:
                entries = self._batches.get()
                if entries is None:
                    return
                try:
                    result = step.deliver(entries)
                except BaseException as exc:  # raised again in the feed's thread
                    failure = exc
                    return  # nothing after a failed batch may be delivered
                self._results.put(result)
        finally:
            with self._closing:  # after this, no interrupt() may reach the closed sinks
                self._closed = True
                try:
                    step.close()
                except Exception:
                    log.exception("closing the sink failed")
            if failure is not None:
                # Only now: the run ends on it, and a next run with the same sinks must find
                # them closed already, not closed (or told to stop) under it by this thread.
                self._results.put(failure)

    # -- the feed's thread ---------------------------------------------------------------------

    def hand_over(self, entries: list[_Entry]) -> None:
        """Give ``entries`` to the sink thread (after every batch given before)."""
        if entries and self.inline:
            self.confirm(self.sink_step.deliver(entries))
        elif entries:
            if not self.in_flight:
                self.handed_at = time.monotonic()
            self.in_flight += 1
            self._batches.put(entries)

    def poll(self, timeout: float = 0.0) -> None:
        """Take the results that arrived (waiting up to ``timeout`` for one) and confirm them.

        Raises the sink's failure (what was confirmed before it is acknowledged by the
        delivery loop).
        """
        if not timeout and self._results.empty():  # the common case, per change: keep it cheap
            return
        try:
            result = self._results.get(timeout=timeout) if timeout else self._results.get_nowait()
            while True:
                self.in_flight -= 1
                if isinstance(result, BaseException):
                    raise result
                self.confirm(result)
                self.handed_at = time.monotonic()  # the next batch (if any) starts now
                result = self._results.get_nowait()
        except queue.Empty:
            pass

    def offer(self, sink_step: _SinkStep, cap: int) -> None:
        """The waiting batch is due: hand it over if the sink is free; if the sink is busy, let
        it grow, and wait for the sink only once it holds ``cap`` entries or items."""
        self.poll()
        if self.in_flight and (sink_step.items >= cap or len(sink_step.entries) >= cap):
            self.wait()
        if not self.in_flight:
            self.hand_over(sink_step.take())

    def idle(self, sink_step: _SinkStep) -> None:
        """The source has nothing more at hand: hand the waiting batch over if the sink is free.

        If the sink is slow (busy for `SLOW_SINK` seconds), wait for it here, answering the
        source with keep_alive(); a sink busy for less gets no wait: the feed reads on, and the
        batch goes at the next idle moment or once due (this keeps thread hand-overs rare
        while changes stream fast).
        """
        self.poll()
        if self.in_flight and time.monotonic() - self.handed_at >= SLOW_SINK:
            self.wait()
        if not self.in_flight:
            self.hand_over(sink_step.take())

    def finish(self, entries: list[_Entry]) -> None:
        """Deliver ``entries`` after what is in flight, and wait until all is confirmed."""
        self.wait()
        self.hand_over(entries)
        self.wait()

    def wait(self) -> None:
        """Wait until the sink confirmed everything handed over, answering the source meanwhile
        (`SinkWait`: raises `StopTimeout` once a stop request has waited long enough)."""

        def confirmed(seconds: float) -> bool:
            if self.in_flight:
                self.poll(seconds)
            return not self.in_flight

        self.waiting.until(confirmed)

    def close(self, wait: bool) -> None:
        """End the sink thread: at once (after a failure or a stop), or once it closed the
        sinks (``wait``)."""
        if self.inline:
            self.sink_step.close()
            return
        if not wait:
            with self._closing:
                if not self._closed:  # a closed sink must not keep the request for a next run
                    self.sink_step.interrupt()  # a retrying sink gives up its batch, unconfirmed
        self._batches.put(None)
        if wait:
            self._thread.join(CLOSE_WAIT)
