"""Looking at processes from a test (Linux /proc): their descendants, and whether they ended.

Used by the tests that kill a parent with SIGKILL and check that nothing it started lives on.
"""

from __future__ import annotations

import time
from pathlib import Path

from waiting import wait_until


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (of every thread of it)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    found, queue = [], children(pid)
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue += children(child)
    return found


def ended(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (it ended; only its exit status is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def wait_ended(pids: list[int], seconds: float, what: str) -> float:
    """Wait until every process of ``pids`` ended; fail naming those alive after ``seconds``.
    Returns how long it took."""
    started = time.monotonic()

    def alive() -> str:
        return ", ".join(f"{pid} ({command_line(pid)[:80]})" for pid in pids if not ended(pid))

    wait_until(lambda: all(ended(pid) for pid in pids), f"{what} to end", seconds,
               said=lambda: f"still alive: {alive()}")
    return time.monotonic() - started
