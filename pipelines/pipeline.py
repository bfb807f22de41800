"""`Pipeline`: feed -> stages -> sink, with acknowledgement only after the sink confirms.

    >>> from changefeed.testing import MemoryFeed, ListSink, insert
    >>> from changefeed.pipelines import Pipeline, where, to_delta
    >>> feed = MemoryFeed("tasks", changes=[insert("tasks", {"id": 1, "done": False}),
    ...                                     insert("tasks", {"id": 2, "done": True})])
    >>> sink = ListSink()
    >>> Pipeline(feed, [where(lambda c: not c.new["done"]), to_delta("Task")], sink=sink).run()
    2
    >>> sink.items
    [{'type': 'insert', 'model': 'Task', 'data': {'id': 1, 'done': False}}]
    >>> feed.checkpoint.load("tasks")     # both changes handled: one delivered, one dropped
    2

Design notes
------------
*Units of work.* Each change becomes an entry: its position, the items the stages made of it so
far, and (when a dead-letter sink is set) the change itself. A stage returning None leaves the
entry empty; the entry still travels to the sink step, which is what makes a dropped change
count as handled, in order, without any bookkeeping on the side.

*Acknowledgement.* The sink step groups entries into batches (`batch()`; by default up to 1000
items, at most 1 second old, and whenever the feed goes idle), delivers a batch, and only then
reports the last position of that batch as confirmed. Entries reach the sink in feed order (one
sink thread or process, FIFO queues), so a confirmed position implies every earlier one:
`feed.ack` is never called for a position while an earlier one is unconfirmed.

*One loop.* `run()` is `changefeed.delivery.deliver` with an output of this module (or of
`_processes`): the loop that acknowledges in order, stops, and keeps what was delivered when
the feed fails is the same one ``changefeed run`` uses to write JSON lines.

*A slow sink.* In-process, the sink runs in a thread of its own (`_sink_thread`): while it works the
feed's thread keeps reading, so the next batch grows toward the backlog (the default batch up
to `GROWTH` times its size; an explicit `batch(size)` stays a hard limit), and while it must
wait it calls ``feed.keep_alive()`` so the database is answered. A stop request (Ctrl-C,
SIGTERM, `stop()`) ends a run within a few seconds even if the sink hangs or retries: what was
confirmed is acknowledged, the rest comes again on the next run.

*Processes.* By default everything runs in the calling process: no pickling, lowest latency.
`own_process(step)` (or ``processes=True``, which marks every stage and the sink) runs steps as
`multipipes.Node` processes connected by queues; chunks of entries cross the boundaries, and the
sink's process sends confirmations back on a queue to the feed's process, which alone calls
`feed.ack`. Worker processes are forked when the pipeline starts, before the feed connects, so
they share no connection with it (stages must be picklable only where processes are spawned).

*Failures.* A stage or sink that raises stops the pipeline with a `PipelineError` naming it and
the position; what came before the failure is delivered and acknowledged, nothing after it.
With ``dead_letter=sink`` the failed change goes there as ``{"change": ..., "error": ...,
"stage": ...}`` instead and counts as handled. A worker process that dies (SIGKILL, OOM) stops
the pipeline too; what it had not confirmed is not acknowledged and comes again on restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from changefeed.delivery import Output, deliver
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.pipelines._processes import MultiProcessOutput
from changefeed.pipelines._sink_thread import _SinkThread
from changefeed.pipelines._steps import _Confirmed, _Entry, _Segment, _SinkStep
from changefeed.pipelines.stages import BatchPolicy, Stage, own_process

log = logging.getLogger("changefeed.pipelines")

DEFAULT_BATCH = BatchPolicy(size=1000, seconds=1.0, explicit=False)
GROWTH = 10
"""While the sink is busy, a default batch grows up to this many times its size."""


class Pipeline:
    """Feed -> stages -> sink, acknowledging each position once the sink has its change.

    Args:
        feed: a `ChangeFeed` (or anything with ``changes()`` and ``ack()``); it stays in the
            calling process, which alone acknowledges.
        stages: stages in order (see `changefeed.pipelines.stages`); a `batch()` may come last;
            `own_process(stage)` marks where a new process starts.
        sink: a sink (see `changefeed.pipelines.sinks`), possibly wrapped in `own_process`.
        dead_letter: a sink for changes whose stage or sink failed; None stops the pipeline
            on the first failure instead.
        processes: True runs every stage and the sink in its own process.
        ack_interval: acknowledge at most this often (seconds): a file checkpoint fsyncs on each
            acknowledgement. The last confirmed position is always acknowledged at the end.
    """

    def __init__(
        self,
        feed: Any,
        stages: Sequence[Any] = (),
        *,
        sink: Any,
        dead_letter: Any = None,
        processes: bool = False,
        ack_interval: float = 0.0,
    ) -> None:
        if sink is None:
            raise ConfigurationError("a pipeline needs a sink")
        self.feed = feed
        self.dead_letter = dead_letter
        steps = list(stages)
        self.policy = DEFAULT_BATCH
        if steps and isinstance(steps[-1], BatchPolicy):
            self.policy = steps.pop()
        for step in steps:
            if isinstance(step, BatchPolicy):
                raise ConfigurationError(
                    "batch() must be the last stage: it sets how items reach the sink"
                )
            target = step.stage if isinstance(step, own_process) else step
            if not callable(target):
                raise ConfigurationError(f"stage {target!r} is not callable")
        if processes:
            steps = [s if isinstance(s, own_process) else own_process(s) for s in steps]
            if not isinstance(sink, own_process):
                sink = own_process(sink)
        # Group the steps by process: group 0 runs in the feed's process.
        self._groups: list[list[Stage]] = [[]]
        for step in steps:
            if isinstance(step, own_process):
                self._groups.append([step.stage])
            else:
                self._groups[-1].append(step)
        if isinstance(sink, own_process):
            self._groups.append([])
            sink = sink.stage
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
        at most (`STOP_GRACE`); what the sink did not confirm by then comes again next run."""
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


class _InProcessOutput(Output):
    """Stages in the feed's thread, the sink in a thread of its own (`_SinkThread`)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.segment = _Segment(pipeline._groups[0], keep_change=True,
                                dead_letter=pipeline.dead_letter)
        self.sink_step = _SinkStep(pipeline.sink, pipeline.dead_letter, pipeline.policy)
        policy = pipeline.policy
        self.cap = policy.size if policy.explicit else policy.size * GROWTH
        self.feed = pipeline.feed

    def open(self) -> None:
        self.sink_thread = _SinkThread(self.sink_step, self.feed, self._confirmed)

    def put(self, change: Any) -> None:
        sink_step = self.sink_step
        entries, failure = self.segment.process([_Entry(change, keep_change=True)])
        sink_step.add(entries)
        if failure is not None:
            self.sink_thread.finish(sink_step.take())  # what came before the failure
            raise PipelineError(failure.message) from failure.cause
        if sink_step.due(time.monotonic()):
            self.sink_thread.offer(sink_step, self.cap)

    def idle(self) -> None:
        self.sink_thread.idle(self.sink_step)

    def finish(self) -> None:
        self.sink_thread.finish(self.sink_step.take())

    def close(self, clean: bool) -> None:
        self.sink_thread.close(wait=clean)

    def _confirmed(self, confirmed: _Confirmed | None) -> None:
        if confirmed is not None:
            self.confirm(confirmed.position, confirmed.count)
