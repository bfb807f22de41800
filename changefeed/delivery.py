"""Delivery: the one loop that takes a feed's changes to an output and acknowledges them.

(The engine comes in the next commit; for now this holds `ThrottledAcks`.)
"""

from __future__ import annotations

import time

from changefeed.change import Position
from changefeed.feed import ChangeFeed


class ThrottledAcks:
    """Acknowledges the latest delivered position of a feed, at most every ``interval`` seconds.

    A file checkpoint fsyncs on each acknowledgement, and under load output is confirmed
    hundreds of times a second; acknowledging less often caps that cost, and a crash then
    repeats at most ``interval`` seconds of output, never loses any.
    """

    __slots__ = ("feed", "interval", "pending", "last")

    def __init__(self, feed: ChangeFeed, interval: float) -> None:
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


