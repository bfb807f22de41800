"""The TCP sockets a process holds, read from Linux's /proc (for tests that must know which
process a port or a connection belongs to)."""

from __future__ import annotations

import contextlib
import os

LISTEN = "0A"
"""The state column of a listening socket in /proc/net/tcp."""


def tcp_sockets(pid: int) -> list[tuple[int, str]]:
    """(local port, state) of each TCP socket process ``pid`` holds; empty once it ended."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    except OSError:  # it ended
        return []
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as sockets:
            for line in list(sockets)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((int(fields[1].rsplit(":", 1)[1], 16), fields[3]))
    return found
