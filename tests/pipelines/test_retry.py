"""`RemoteSink.retrying`, the one retry loop of the network sinks (webhook, Snorky, Redis)."""

from __future__ import annotations

import threading
import time

import pytest

from changefeed import PipelineError, Retry
from changefeed.pipelines.sinks import RemoteSink, Retryable, SinkInterrupted


class Attempts(RemoteSink):
    """A remote sink whose attempt fails with the given errors, in order, then succeeds."""

    def __init__(self, *errors: Exception, retry: Retry) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.retry = retry
        self.name = "attempts"
        self._interrupted = threading.Event()

    def attempt(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "delivered"


FAST = Retry(initial=0.01, maximum=0.02, attempts=3)


@pytest.mark.parametrize("failures", [0, 1, 3])
def test_retryable_failures_are_tried_again_up_to_the_bound(failures):
    sink = Attempts(*[Retryable(f"down {n}") for n in range(failures)], retry=FAST)
    assert sink.retrying(sink.attempt, "server") == "delivered"
    assert sink.calls == failures + 1


@pytest.mark.parametrize("attempts", [0, 2, 4])
def test_past_the_bound_the_last_problem_is_a_pipeline_error(attempts):
    cause = ConnectionResetError("reset")
    errors = [Retryable(f"down {n}") for n in range(attempts)]
    last = Retryable(f"down {attempts}")
    last.__cause__ = cause
    sink = Attempts(*errors, last, retry=Retry(initial=0.01, maximum=0.02, attempts=attempts))
    expected = rf"^server failed {attempts + 1} times; last: down {attempts}$"
    with pytest.raises(PipelineError, match=expected) as info:
        sink.retrying(sink.attempt, "server")
    assert sink.calls == attempts + 1 and info.value.__cause__ is cause


@pytest.mark.parametrize("error", [ValueError("bad"), PipelineError("answered 400")])
def test_other_failures_are_not_retried(error):
    sink = Attempts(error, retry=FAST)
    with pytest.raises(type(error)):
        sink.retrying(sink.attempt, "server")
    assert sink.calls == 1


def test_an_interrupt_ends_the_backoff_at_once_and_the_next_batch_before_it_starts():
    sink = Attempts(*[Retryable("down")] * 10, retry=Retry(initial=30, maximum=30))
    threading.Timer(0.2, sink.interrupt).start()
    started = time.monotonic()
    with pytest.raises(SinkInterrupted, match="stopped while retrying; last: down"):
        sink.retrying(sink.attempt, "server")
    assert time.monotonic() - started < 10 and sink.calls == 1
    with pytest.raises(SinkInterrupted, match="stopped before the batch was delivered"):
        sink.retrying(sink.attempt, "server")
    assert sink.calls == 1
    sink.close()  # a closed sink forgets the interrupt
    sink.errors.clear()
    assert sink.retrying(sink.attempt, "server") == "delivered"
