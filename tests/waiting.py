"""Waiting in tests: every wait is on a condition with a deadline, never a fixed sleep.

A slow machine then makes a test slower, never hang nor pass by luck; a failure names what did
not happen and, for a process, what it said.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30, *,
               ended: Callable[[], bool] | None = None, said: Callable[[], str] | None = None,
               pause: Callable[[float], object] = time.sleep, step: float = 0.05) -> T:
    """Call ``condition()`` until it returns a true value, and return that value.

    Fails the test (AssertionError naming ``what``) once ``timeout`` seconds have passed, or as
    soon as ``ended()`` says that the process expected to bring it about has ended (after one
    last look). ``said()`` adds what that process said to the message. Between two looks it
    calls ``pause(step)`` (a process driver passes one that reads the process's output).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if ended is not None and ended():
            value = condition()  # what it did before it ended
            if value:
                return value
            problem = "it ended"
        elif time.monotonic() > deadline:
            problem = f"not within {timeout} s"
        else:
            pause(step)
            continue
        message = f"waiting for {what}: {problem}"
        if said is not None:
            message += f"; it said:\n{said()}"
        raise AssertionError(message)
