"""`Pipeline`: feed -> stages -> sink, with acknowledgement only after the sink confirms.

    >>> from changefeed import Pipeline, testing, to_delta, where
    >>> feed = testing.MemoryFeed("tasks", changes=[
    ...     testing.insert("tasks", {"id": 1, "done": False}),
    ...     testing.insert("tasks", {"id": 2, "done": True}),
    ... ])
    >>> sink = testing.ListSink()
    >>> Pipeline(feed, [where(lambda c: not c.new["done"]), to_delta("Task")], sink=sink).run()
    2
    >>> sink.items
    [{'type': 'insert', 'model': 'Task', 'data': {'id': 1, 'done': False}}]
    >>> feed.checkpoint.load("tasks")     # both changes handled: one delivered, one dropped
    2

Each change becomes an entry (`_steps`) that reaches the sink step even when a stage dropped
it, so a dropped change counts as handled, in order; the sink step confirms the last position
of each batch it delivered. `run()` is `changefeed.delivery.deliver` with an output of this
module (stages here, the sink in `_sink_thread`) or of `_processes`. The README's "Compose a
pipeline" says what a user sees: batching, a slow sink, processes, failures, dead letters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from changefeed._speedups import Lines
from changefeed.delivery import Feed, Output, deliver
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.pipelines._processes import MultiProcessOutput
from changefeed.pipelines._sink_thread import _SinkThread
from changefeed.pipelines._steps import (
    _Confirmed,
    _Entry,
    _Segment,
    _SinkStep,
    freeze_heap,
    thaw_heap,
)
from changefeed.pipelines.sinks import BatchSink, Sink
from changefeed.pipelines.stages import BatchPolicy, OwnProcess, Stage, checked_count

log = logging.getLogger("changefeed.pipelines")

DEFAULT_BATCH = BatchPolicy(size=1000, seconds=1.0, explicit=False)
GROWTH = 10
"""While the sink is busy, a default batch grows up to this many times its size."""


class Pipeline:
    """Feed -> stages -> sink, acknowledging each position once the sink has its change.

    Args:
        feed: a `ChangeFeed` (or anything `changefeed.delivery.Feed` describes); it stays in the
            calling process, which alone acknowledges.
        stages: stages in order (see `changefeed.pipelines.stages`); `own_process(stage)` marks
            where a new process starts.
        sink: a sink (see `changefeed.pipelines.sinks`), possibly wrapped in `own_process`.
        batch_size, batch_seconds: group items for the sink: at most ``batch_size`` items (1000
            when only ``batch_seconds`` is given), none older than ``batch_seconds`` (1.0). A
            batch also goes as soon as the feed is idle. Without either, batches are of 1000
            items and grow up to 10 times that while the sink is busy, and a plain callable
            sink is called once per item; with either, the size is a hard limit and a plain
            callable sink gets each batch as a list.
        dead_letter: a sink for changes whose stage or sink failed; None stops the pipeline
            on the first failure instead.
        processes: True runs every stage and the sink in its own process.
        workers: with ``processes``, each stage's process runs in this many copies (see
            `own_process`; the sink's runs alone). More than 1 implies ``processes``.
        ack_interval: acknowledge at most this often (seconds): a file checkpoint fsyncs on each
            acknowledgement. The last confirmed position is always acknowledged at the end.

    It holds no resources between runs: `run()` opens the sinks and closes them, and the
    feed's connection, before it returns.
    """

    def __init__(
        self,
        feed: Feed,
        stages: Sequence[Stage | OwnProcess] = (),
        *,
        sink: Sink | BatchSink | Callable[[Any], Any] | OwnProcess,
        batch_size: int | None = None,
        batch_seconds: float | None = None,
        dead_letter: Sink | BatchSink | Callable[[Any], Any] | None = None,
        processes: bool = False,
        workers: int = 1,
        ack_interval: float = 0.0,
    ) -> None:
        if sink is None:
            raise ConfigurationError("a pipeline needs a sink")
        self.feed = feed
        self.dead_letter = dead_letter
        steps: list[Any] = list(stages)
        self.policy = DEFAULT_BATCH
        if batch_size is not None or batch_seconds is not None:
            self.policy = BatchPolicy(
                size=batch_size if batch_size is not None else DEFAULT_BATCH.size,
                seconds=batch_seconds if batch_seconds is not None else DEFAULT_BATCH.seconds,
            )
        if steps and isinstance(steps[-1], BatchPolicy):  # the deprecated batch() stage
            if self.policy is not DEFAULT_BATCH:
                raise ConfigurationError(
                    "batching given twice: drop the batch() stage, batch_size= and"
                    " batch_seconds= replace it"
                )
            self.policy = steps.pop()
        for step in steps:
            if isinstance(step, BatchPolicy):
                raise ConfigurationError(
                    "batch() must be the last stage: it sets how items reach the sink (give"
                    " Pipeline(..., batch_size=..., batch_seconds=...) instead)"
                )
            target = step.stage if isinstance(step, OwnProcess) else step
            if not callable(target):
                raise ConfigurationError(f"stage {target!r} is not callable")
        checked_count(workers, "workers")
        if workers > 1 or processes:
            steps = [s if isinstance(s, OwnProcess) else OwnProcess(s, workers) for s in steps]
            if not isinstance(sink, OwnProcess):
                sink = OwnProcess(sink)
        # Group the steps by process: group 0 runs in the feed's process.
        self._groups: list[list[Stage]] = [[]]
        self._workers: list[int] = [1]
        """How many copies of each group's process run (the feed's: 1)."""
        for step in steps:
            if isinstance(step, OwnProcess):
                self._groups.append([cast(Stage, step.stage)])  # a stage: checked callable
                self._workers.append(step.workers)
            else:
                self._groups[-1].append(step)
        sink_alone = isinstance(sink, OwnProcess)
        if isinstance(sink, OwnProcess):  # (again: mypy narrows on the call, not on sink_alone)
            if sink.workers > 1:
                raise ConfigurationError(
                    f"{sink!r}: the sink runs in one process (it writes in the feed's order);"
                    " give workers= to the stages' own_process() instead")
            sink = sink.stage
        if sink_alone or self._workers[-1] > 1:
            # The sink's own process, which also puts the copies' batches back in order.
            self._groups.append([])
            self._workers.append(1)
        self.sink = sink
        self.ack_interval = ack_interval
        self._output: Output | None = None

    @property
    def handled(self) -> int:
        """Changes handled (delivered, dropped or dead-lettered) and confirmed in the last run."""
        return self._output.handled if self._output is not None else 0

    @property
    def multiprocess(self) -> bool:
        """Whether some steps run in processes of their own."""
        return len(self._groups) > 1

    def stop(self) -> None:
        """Ask a running `run()` to finish (safe from a signal handler or another thread): it
        delivers and acknowledges what it has, waiting for a slow or retrying sink a few seconds
        at most (`changefeed.delivery.STOP_GRACE`); what the sink did not confirm by then comes
        again on the next run."""
        self.feed.stop()

    def run(
        self,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Run until the feed ends, ``timeout`` seconds pass, no change arrives for
        ``idle_timeout`` seconds, or ``limit`` changes were read; return how many changes
        were handled (delivered, dropped or dead-lettered) and acknowledged.

        Raises `PipelineError` when a stage or sink fails (without a dead-letter sink) or a worker
        process dies; the feed's own errors after delivering and acknowledging what came before.
        """
        return deliver(
            self.feed, self.output(), limit=limit, idle_timeout=idle_timeout,
            timeout=timeout, ack_interval=self.ack_interval,
        ).count

    def output(self) -> Output:
        """The pipeline as an output of `changefeed.delivery.deliver` (which `run()` calls):
        for a caller that wants the delivery loop's other options (progress, the result)."""
        self._output = MultiProcessOutput(self) if self.multiprocess else _InProcessOutput(self)
        return self._output


STAGE_BATCH = 500
"""Changes gathered before the stages run on them (at most the batch size): a batch through a
stage costs far less per change than a call per change (`_Segment`)."""


class _InProcessOutput(Output):
    """Stages in the feed's thread, the sink in a thread of its own (`_SinkThread`)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.segment = _Segment(pipeline._groups[0], keep_change=True,
                                dead_letter=pipeline.dead_letter)
        self.sink_step = _SinkStep(pipeline.sink, pipeline.dead_letter, pipeline.policy)
        policy = pipeline.policy
        self.cap = policy.size if policy.explicit else policy.size * GROWTH
        self.stage_batch = min(STAGE_BATCH, policy.size)
        self.seconds = policy.seconds
        self.feed = pipeline.feed
        self.pending: list[_Entry] = []
        """Changes taken that the stages did not see yet."""
        self.pending_lines = 0
        """How many more changes than entries ``pending`` holds (in batches of `Lines`)."""
        self.pending_since = 0.0

    def open(self) -> None:
        freeze_heap()
        self.sink_thread = _SinkThread(self.sink_step, self.feed, self._confirmed)

    def put(self, change: Any) -> None:
        pending = self.pending
        if not pending:
            self.pending_since = time.monotonic()
        pending.append(_Entry(change, keep_change=True))
        if change.__class__ is Lines:  # a batch of the feed's own lines (`prefer_lines`)
            self.pending_lines += change.count - 1
        if len(pending) + self.pending_lines >= self.stage_batch or (
                time.monotonic() - self.pending_since >= self.seconds):
            self._run_stages()
            if self.sink_step.due(time.monotonic()):
                self.sink_thread.offer(self.sink_step, self.cap)

    def _run_stages(self) -> None:
        """Run the stages on the pending changes; raise a stage's failure once what came
        before it is delivered."""
        if not self.pending:
            return
        sink_step = self.sink_step
        entries, failure = self.segment.process(self.pending)
        self.pending = []
        self.pending_lines = 0
        sink_step.add(entries, since=self.pending_since)
        if failure is not None:
            self.sink_thread.finish(sink_step.take())  # what came before the failure
            raise PipelineError(failure.message) from failure.cause

    def idle(self) -> None:
        self._run_stages()
        self.sink_thread.idle(self.sink_step)

    def finish(self) -> None:
        self._run_stages()
        self.sink_thread.finish(self.sink_step.take())

    def close(self, clean: bool) -> None:
        try:
            self.sink_thread.close(wait=clean)
        finally:
            thaw_heap()

    def _confirmed(self, confirmed: _Confirmed | None) -> None:
        if confirmed is not None:
            self.confirm(confirmed.position, confirmed.count)
