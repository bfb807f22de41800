"""Read pacing: when a replication stream that reads a backlog lets bytes gather in its socket
before reading them (`ReadPacing`), and how many wait there (`waiting_bytes`)."""

from __future__ import annotations

import fcntl
import sys
import termios


class ReadPacing:
    """When to let a busy stream's bytes gather before reading them. The walsender flushes its
    socket after every message; a reader that takes each one the moment it arrives keeps
    the sender's queue empty, so every message crosses as a TCP segment of its own, and the
    kernel work per segment (on loopback, charged to the walsender and the feed) bounds the
    stream: 1.24M segments for 1M changes. Data left unread a moment lets the kernel merge
    the sender's writes (2,700 segments, twice the throughput, a sixth of the CPU). So while
    the stream reads transactions the server sent `BEHIND_SECONDS` or more after their commit
    (a backlog, where a millisecond is nothing; both times by the server's clock, so neither
    our clock nor how long our consumer took counts) and `BUSY_WAKEUPS` wake-ups in a row
    found bytes already waiting, a wake-up that finds fewer than `ENOUGH_BYTES` waiting first
    pauses `PAUSE` seconds. A live stream is never paused, so its latency is untouched; nor is
    a wake-up with nothing or with enough waiting, so a fast backlog is never held to what one
    pause lets in. See "Read pacing" in the README's Benchmark section."""

    BEHIND_SECONDS = 0.5
    BUSY_WAKEUPS = 8
    ENOUGH_BYTES = 16384
    PAUSE = 0.001

    def __init__(self) -> None:
        self.busy = 0  # wake-ups in a row that found bytes waiting

    def reading_backlog(self, behind: float) -> bool:
        """Whether the last transaction read, sent ``behind`` seconds after its commit, is a
        backlog's (then ask `pause`). A live one ends the streak: its reader need not ask the socket
        how much waits (a system call per wake-up)."""
        if behind < self.BEHIND_SECONDS:
            self.busy = 0
            return False
        return True

    def pause(self, waiting: int, behind: float) -> float:
        """Seconds to pause before reading, given the bytes ``waiting`` in the socket and how
        many seconds after its commit the last transaction read was sent."""
        if waiting <= 0 or not self.reading_backlog(behind):
            self.busy = 0
            return 0.0
        self.busy += 1
        if self.busy >= self.BUSY_WAKEUPS and waiting < self.ENOUGH_BYTES:
            return self.PAUSE
        return 0.0


_COUNT = bytes(4)


def waiting_bytes(socket: int) -> int:
    """The bytes received on ``socket`` not read yet (0 where the platform cannot say)."""
    try:
        return int.from_bytes(fcntl.ioctl(socket, termios.FIONREAD, _COUNT), sys.byteorder)
    except (OSError, ValueError):  # ValueError: a closed socket's -1
        return 0
