"""`Retry`: exponential backoff with full jitter, the policy of a feed's reconnects and of the
sinks' deliveries (`changefeed.pipelines.sinks.RemoteSink.retrying`)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    """How often and how long to wait between attempts after consecutive failures.

    The n-th consecutive failure waits a random time between half and all of
    ``min(maximum, initial * 2**(n-1))`` seconds (jitter keeps many clients from retrying in
    step). ``attempts`` bounds consecutive failures (None: retry forever).
    """

    initial: float = 0.5
    maximum: float = 30.0
    attempts: int | None = None

    def exhausted(self, failures: int) -> bool:
        """Whether ``failures`` consecutive failures are past the bound: give up, do not wait."""
        return self.attempts is not None and failures > self.attempts

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (1 for the first)."""
        ceiling = min(self.maximum, self.initial * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


__all__ = ["Retry"]
