"""The numbers an option may take: durations and counts that mean something.

Every numeric setting (the commands' options, the keys of ``changefeed serve``'s config file, a
sink URL's parameters) goes through these, so that ``nan``, ``inf``, a negative size or a count
PostgreSQL cannot hold (``--chunk-size 99999999999999999999`` reached the server as ``bigint
out of range``) is refused in one line before a run starts.
"""

from __future__ import annotations

import math
from typing import Any

from changefeed.errors import ConfigurationError

MAX_SECONDS = 365 * 24 * 3600.0
"""The longest duration a setting takes (a year): longer ones mean nothing a run can wait for,
and overflow the calls that wait (``time.sleep``, ``select``)."""
MAX_COUNT = 2**63 - 1
"""The largest count a setting takes: PostgreSQL's bigint, which rows and bytes are counted in."""


def seconds_problem(value: Any, *, minimum: float = 0.0, open_minimum: bool = True) -> str | None:
    """What is wrong with ``value`` as a duration in seconds (None: nothing): it must be a
    finite number above ``minimum`` (or equal to it, unless ``open_minimum``), at most
    `MAX_SECONDS`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number of seconds"
    if not math.isfinite(value):
        return f"must be a finite number of seconds, not {value}"
    low = value <= minimum if open_minimum else value < minimum
    if low or value > MAX_SECONDS:
        floor = "greater than" if open_minimum else "at least"
        return (f"must be {floor} {minimum:g} and at most {MAX_SECONDS:.0f} seconds"
                " (a year)")
    return None


def count_problem(value: Any, *, minimum: int = 1) -> str | None:
    """What is wrong with ``value`` as a count (None: nothing): a whole number from ``minimum``
    to `MAX_COUNT`."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be a whole number"
    if not minimum <= value <= MAX_COUNT:
        return f"must be from {minimum} to {MAX_COUNT}"
    return None


def parse_seconds(text: str, name: str, **limits: Any) -> float:
    """``text`` (a URL parameter, say) as seconds, or `ConfigurationError` naming ``name``."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(f"{name}={text!r}: must be a number of seconds") from None
    problem = seconds_problem(value, **limits)
    if problem is not None:
        raise ConfigurationError(f"{name}={text!r}: {problem}")
    return value + 0.0  # -0.0 is 0.0


def parse_count(text: str, name: str, **limits: Any) -> int:
    """``text`` as a count, or `ConfigurationError` naming ``name``."""
    stripped = text.strip()
    value: Any = int(stripped) if stripped.isdigit() else None
    problem = count_problem(value, **limits) if value is not None else "must be a whole number"
    if problem is not None:
        raise ConfigurationError(f"{name}={text!r}: {problem}")
    return value


__all__ = ["MAX_COUNT", "MAX_SECONDS", "count_problem", "parse_count", "parse_seconds",
           "seconds_problem"]
