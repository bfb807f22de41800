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
items, at most 1 second old, and whenever the feed goes quiet), delivers a batch, and only then
reports the last position of that batch as confirmed. Entries reach the sink in feed order (one
process per step, FIFO queues), so a confirmed position implies every earlier one: `feed.ack`
is never called for a position while an earlier one is unconfirmed.

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
import queue
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Any

import multipipes

from changefeed.change import Change, Position
from changefeed.errors import ChangefeedError, ConfigurationError, PipelineError
from changefeed.feed import ThrottledAcks
from changefeed.pipelines.sinks import deliver
from changefeed.pipelines.stages import (
    BatchPolicy,
    Stage,
    apply_stage,
    own_process,
    stage_name,
)

log = logging.getLogger("changefeed.pipelines")

DEFAULT_BATCH = BatchPolicy(size=1000, seconds=1.0, explicit=False)


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
        self.handled = 0
        """Changes handled (delivered, dropped or dead-lettered) and confirmed so far."""
        self._acks = ThrottledAcks(feed, ack_interval)

    @property
    def multiprocess(self) -> bool:
        """Whether some steps run in processes of their own."""
        return len(self._groups) > 1

    def stop(self) -> None:
        """Ask a running `run()` to finish: it delivers and acknowledges what it has."""
        self.feed.stop()

    def run(
        self,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        stop_after: int | None = None,
    ) -> int:
        """Run until the feed ends, ``timeout`` seconds pass, no change arrives for
        ``idle_timeout`` seconds, or ``stop_after`` changes were read; return how many changes
        were handled (delivered, dropped or dead-lettered) and acknowledged.

        Raises `PipelineError` when a stage or sink fails (without a dead-letter sink) or a worker
        process dies; the feed's own errors after delivering and acknowledging what came before.
        """
        self.handled = 0
        changes = self.feed.changes(
            timeout=timeout, idle_timeout=idle_timeout, stop_after=stop_after, ticks=True
        )
        if self.multiprocess:
            return _MultiProcessRun(self).run(changes)
        return self._run_in_process(changes)

    # -- in-process ----------------------------------------------------------------------------

    def _run_in_process(self, changes: Iterable[Any]) -> int:
        segment = _Segment(self._groups[0], keep_change=True, dead_letter=self.dead_letter)
        sink_step = _SinkStep(self.sink, self.dead_letter, self.policy)
        monotonic = time.monotonic
        try:
            try:
                for change in changes:
                    if change is None:  # the feed is quiet: deliver what is waiting
                        self._confirm(sink_step.flush())
                        continue
                    entries, failure = segment.process([_Entry(change, keep_change=True)])
                    sink_step.add(entries)
                    if failure is not None:
                        self._confirm(sink_step.flush(), final=True)
                        raise PipelineError(failure.message) from failure.cause
                    if sink_step.due(monotonic()):
                        self._confirm(sink_step.flush())
            except PipelineError:
                raise
            except ChangefeedError:
                self._confirm(sink_step.flush(), final=True)  # the feed failed, not the output
                raise
            self._confirm(sink_step.flush(), final=True)
        finally:
            sink_step.close()
        return self.handled

    def _confirm(self, confirmed: _Confirmed | None, final: bool = False) -> None:
        """Count a sink confirmation and acknowledge its position (at most every ack_interval)."""
        position = None
        if confirmed is not None:
            self.handled += confirmed.count
            position = confirmed.position
        self._acks.delivered(position, final)


# -- units of work and the steps that handle them ------------------------------------------------


class _Entry:
    """One change on its way: its position, the items made of it so far, dead letters."""

    __slots__ = ("position", "change", "items", "dead")

    def __init__(self, change: Any, keep_change: bool) -> None:
        self.position: Position = getattr(change, "position", None)
        self.change = change if keep_change else None
        self.items: list[Any] = [change]
        self.dead: list[dict[str, Any]] = []

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.position, self.change, self.items, self.dead)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.position, self.change, self.items, self.dead = state

    def dead_letter(self, stage: str, exc: BaseException) -> None:
        change = self.change
        self.dead.append(
            {
                "change": change.to_dict() if isinstance(change, Change) else change,
                "error": _describe(exc),
                "stage": stage,
            }
        )
        self.items = []


class _Failure:
    """A stage or sink failed: the message travels to the feed's process, which raises it."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        self.message = message
        self.cause = cause

    def __getstate__(self) -> str:  # the cause stays behind: it may not pickle
        return self.message

    def __setstate__(self, message: str) -> None:
        self.message, self.cause = message, None


class _Chunk:
    """Entries crossing a process boundary; ``flush`` asks the sink to deliver at once."""

    __slots__ = ("entries", "flush")

    def __init__(self, entries: list[_Entry], flush: bool) -> None:
        self.entries = entries
        self.flush = flush

    def __getstate__(self) -> tuple[list[_Entry], bool]:
        return (self.entries, self.flush)

    def __setstate__(self, state: tuple[list[_Entry], bool]) -> None:
        self.entries, self.flush = state


class _Confirmed:
    """The sink delivered ``count`` more entries; ``position`` is the last one's (or None)."""

    __slots__ = ("position", "count")

    def __init__(self, position: Position, count: int) -> None:
        self.position = position
        self.count = count

    def __getstate__(self) -> tuple[Position, int]:
        return (self.position, self.count)

    def __setstate__(self, state: tuple[Position, int]) -> None:
        self.position, self.count = state


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ChangefeedError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Segment:
    """Consecutive stages run in one process."""

    def __init__(self, stages: Sequence[Stage], keep_change: bool, dead_letter: Any) -> None:
        self.stages = [(stage, stage_name(stage)) for stage in stages]
        self.keep_change = keep_change
        self.dead_letter = dead_letter is not None

    def process(self, entries: list[_Entry]) -> tuple[list[_Entry], _Failure | None]:
        """Run the stages on each entry; on a failure without dead letters, return the
        entries before the failed one and the failure."""
        if not self.stages:
            return entries, None
        for index, entry in enumerate(entries):
            items = entry.items
            for stage, name in self.stages:
                if not items:
                    break
                try:
                    if len(items) == 1:
                        items = apply_stage(stage, items[0])
                    else:
                        items = [out for item in items for out in apply_stage(stage, item)]
                except Exception as exc:
                    if self.dead_letter:
                        log.warning("stage %s failed at position %r: %s", name, entry.position, exc)
                        entry.dead_letter(name, exc)
                        items = []
                        break
                    message = (
                        f"stage {name} failed on the change at position {entry.position!r}:"
                        f" {_describe(exc)}"
                    )
                    return entries[:index], _Failure(message, exc)
            entry.items = items
        return entries, None


class _SinkStep:
    """Groups entries into batches, delivers them, and says which positions are confirmed."""

    def __init__(self, sink: Any, dead_letter: Any, policy: BatchPolicy) -> None:
        self.sink = sink
        self.name = stage_name(sink)
        self.dead_letter = dead_letter
        self.policy = policy
        self.entries: list[_Entry] = []
        self.items = 0
        self.started = 0.0

    def add(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        if not self.entries:
            self.started = time.monotonic()
        self.entries.extend(entries)
        self.items += sum(len(entry.items) for entry in entries)

    def due(self, now: float) -> bool:
        """Whether the waiting batch is full or old enough to go."""
        size = self.policy.size
        return bool(self.entries) and (
            self.items >= size
            or len(self.entries) >= size
            or now - self.started >= self.policy.seconds
        )

    def flush(self) -> _Confirmed | None:
        """Deliver what is waiting (items, then dead letters); None when nothing was waiting."""
        entries = self.entries
        if not entries:
            return None
        self.entries = []
        self.items = 0
        items: list[Any] = []
        positions: list[Position] = []
        for entry in entries:
            for item in entry.items:
                items.append(item)
                positions.append(entry.position)
        if items:
            try:
                deliver(self.sink, items, positions, self.policy.explicit)
            except Exception as exc:
                where = (
                    f"position {positions[0]!r}"
                    if positions[0] == positions[-1]
                    else f"positions {positions[0]!r}..{positions[-1]!r}"
                )
                message = f"sink {self.name} failed on the batch at {where}: {_describe(exc)}"
                if self.dead_letter is None:
                    raise PipelineError(message) from exc
                log.warning("%s", message)
                for entry in entries:
                    if entry.items:
                        entry.dead_letter(self.name, exc)
        dead = [(record, entry.position) for entry in entries for record in entry.dead]
        if dead:
            try:
                deliver(self.dead_letter, [r for r, _ in dead], [p for _, p in dead], False)
            except Exception as exc:
                raise PipelineError(
                    f"dead-letter sink {stage_name(self.dead_letter)} failed: {_describe(exc)}"
                ) from exc
        last = next((e.position for e in reversed(entries) if e.position is not None), None)
        return _Confirmed(last, len(entries))

    def close(self) -> None:
        for sink in (self.sink, self.dead_letter):
            close = getattr(sink, "close", None)
            if close is not None:
                close()


# -- multi-process -------------------------------------------------------------------------------


class _Worker:
    """The target of one worker process: a segment of stages, and the sink step if last."""

    def __init__(self, segment: _Segment, sink_step: _SinkStep | None) -> None:
        self.segment = segment
        self.sink_step = sink_step
        self.failed = False
        self.__name__ = "+".join(name for _, name in segment.stages) or (
            sink_step.name if sink_step else "worker"
        )
        if sink_step is not None and segment.stages:
            self.__name__ += f"+{sink_step.name}"

    def __call__(self, message: Any = None, timeout: bool = False) -> Any:
        # multipipes puts each item a generator yields on the next queue.
        return self._handle(message)

    def _handle(self, message: Any) -> Any:
        if self.failed:
            return
        sink_step = self.sink_step
        try:
            if message is None:  # no input for a while: deliver a batch that has waited
                if sink_step is not None and sink_step.due(time.monotonic()):
                    yield sink_step.flush()
                return
            if isinstance(message, _Failure):
                if sink_step is not None:
                    confirmed = sink_step.flush()
                    if confirmed is not None:
                        yield confirmed
                self.failed = True
                yield message
                return
            entries, failure = self.segment.process(message.entries)
            if sink_step is None:
                yield _Chunk(entries, message.flush)
            else:
                sink_step.add(entries)
                if failure is not None or message.flush or sink_step.due(time.monotonic()):
                    confirmed = sink_step.flush()
                    if confirmed is not None:
                        yield confirmed
            if failure is not None:
                log.error("%s", failure.message, exc_info=failure.cause)
                self.failed = True
                yield failure
        except PipelineError as exc:
            log.error("%s", exc.message, exc_info=exc.__cause__)
            self.failed = True
            yield _Failure(exc.message)

    def close(self) -> None:
        if self.sink_step is not None:
            self.sink_step.close()


class _WorkerNode(multipipes.Node):
    """A multipipes node that leaves Ctrl-C to the feed's process and closes its sinks."""

    def run_forever(self) -> None:
        # A terminal's Ctrl-C reaches the whole process group; the feed's process decides how
        # to stop (deliver, acknowledge, then send poison pills), so workers ignore it. SIGTERM
        # gets its default back: a handler forked from the feed's process would swallow the
        # terminate() that ends a failed pipeline.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            super().run_forever()
        finally:
            self.target.close()


class _MultiProcessRun:
    """The feed's side of a multi-process pipeline: sends chunks, acknowledges confirmations."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        policy = pipeline.policy
        keep = pipeline.dead_letter is not None
        dead_letter = pipeline.dead_letter
        self.segment = _Segment(pipeline._groups[0], keep_change=keep, dead_letter=dead_letter)
        self.keep_change = keep
        groups = pipeline._groups[1:]
        self.workers = []
        for index, stages in enumerate(groups):
            last = index == len(groups) - 1
            sink_step = _SinkStep(pipeline.sink, pipeline.dead_letter, policy) if last else None
            self.workers.append(_Worker(_Segment(stages, keep, pipeline.dead_letter), sink_step))
        self.chunk_size = policy.size
        self.max_in_flight = 4 * policy.size
        self.sent = 0
        self.confirmed = 0
        self.last_alive_check = time.monotonic()

    def run(self, changes: Iterable[Any]) -> int:
        pipeline = self.pipeline
        self.inqueue = multipipes.Pipe()
        self.outqueue = multipipes.Pipe()
        self.nodes = [
            _WorkerNode(
                target=worker,
                name=worker.__name__,
                timeout=0.1 if worker.sink_step is not None else None,
            )
            for worker in self.workers
        ]
        mp_pipeline = multipipes.Pipeline([self.inqueue, *self.nodes, self.outqueue])
        mp_pipeline.start()  # before the feed connects: the workers share no socket with it
        clean = False
        try:
            self._stream(changes)
            clean = True
        finally:
            if clean:
                mp_pipeline.poison_pill()
            else:
                self._terminate()
        return pipeline.handled

    def _stream(self, changes: Iterable[Any]) -> None:
        chunk: list[_Entry] = []
        started = 0.0
        seconds = self.pipeline.policy.seconds
        monotonic = time.monotonic
        try:
            for change in changes:
                if change is None:
                    if chunk:
                        self._send(chunk, flush=True)
                        chunk = []
                    self._drain()
                    continue
                if not chunk:
                    started = monotonic()
                entries, failure = self.segment.process([_Entry(change, self.keep_change)])
                chunk.extend(entries)
                if failure is not None:
                    self._send(chunk, flush=True)
                    self.inqueue.put(failure)
                    log.error("%s", failure.message, exc_info=failure.cause)
                    self._drain(until_all=True, expect_failure=True)
                    raise AssertionError("unreachable: the failure comes back as PipelineError")
                if len(chunk) >= self.chunk_size or monotonic() - started >= seconds:
                    self._send(chunk, flush=False)
                    chunk = []
                    # Confirmations only follow sends: polling the queue costs ~6 µs, more
                    # than decoding a change, so poll per chunk (and on idle ticks).
                    self._drain()
        except PipelineError:
            raise
        except ChangefeedError:
            self._send(chunk, flush=True)  # the feed failed, not the output: keep what it gave
            self._drain(until_all=True)
            self.pipeline._confirm(None, final=True)
            raise
        self._send(chunk, flush=True)
        self._drain(until_all=True)
        self.pipeline._confirm(None, final=True)

    def _send(self, chunk: list[_Entry], flush: bool) -> None:
        if chunk or flush:
            self.inqueue.put(_Chunk(chunk, flush))
            self.sent += len(chunk)

    def _drain(self, until_all: bool = False, expect_failure: bool = False) -> None:
        """Handle the confirmations that arrived; block while too much is in flight, or (with
        ``until_all``) until everything sent is confirmed."""
        outqueue = self.outqueue
        while True:
            in_flight = self.sent - self.confirmed
            block = (until_all and (in_flight > 0 or expect_failure)) or (
                in_flight > self.max_in_flight
            )
            try:
                message = outqueue.get(timeout=0.1) if block else outqueue.get_nowait()
            except queue.Empty:
                if not block:
                    # Notice a dead worker within a second, also while the feed is quiet.
                    if time.monotonic() - self.last_alive_check >= 1.0:
                        self._check_alive()
                    return
                self._check_alive()
                continue
            if isinstance(message, _Failure):
                self.pipeline._confirm(None, final=True)
                raise PipelineError(message.message)
            self.confirmed += message.count
            self.pipeline._confirm(message)

    def _terminate(self) -> None:
        """End every worker now (after a failure): SIGTERM, then SIGKILL what lingers."""
        processes = [process for node in self.nodes for process in node.processes]
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 5.0
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()

    def _check_alive(self) -> None:
        self.last_alive_check = time.monotonic()
        for node in self.nodes:
            for process in node.processes:
                if not process.is_alive():
                    self.pipeline._confirm(None, final=True)
                    raise PipelineError(
                        f"the process running {node.name} (pid {process.pid}) died with exit"
                        f" code {process.exitcode}; {self.sent - self.confirmed} changes were not"
                        " confirmed and are not acknowledged"
                    )
