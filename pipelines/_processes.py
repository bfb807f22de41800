"""The multi-process mode of `changefeed.pipelines.Pipeline` (``own_process``, ``processes=True``).

Steps marked to run elsewhere become `multipipes.Node` processes connected by queues; chunks of
entries cross the boundaries, packed compactly (`_crossing._Chunk`; the feed's process, when it runs
no stage, packs its changes without making entries), each process runs its stages on a chunk at
a time, and the sink's process sends confirmations back to the feed's
process, which alone acknowledges, in order, and waits for them through
`changefeed.delivery.SinkWait` (the source answered, a stop a few seconds at most). Between two
reads, a feed whose workers are busy waits on their confirmations and the source at once
(`ChangeFeed.wait_for_source`): it reads on into the chunk it holds if the source sends first,
and sends it the moment the workers are free, so chunks grow to what the workers take.

A stage's process may run in several copies (``own_process(stage, workers=N)``, ``changefeed
run --workers N``), for stages that cost more CPU than one core gives: the copies take chunks
from one queue, and the next single process (the sink's at the latest) puts them back in the
order the feed's process numbered them (`_crossing.InOrder`) before it runs or writes anything.

A worker never outlives the feed's process: if that process is killed (``kill -9``, the OOM
killer), each worker notices through its parent's sentinel and exits at once (see
`_workers._exit_with_parent`; what runs in a worker is in `_workers`). Nothing a worker still
holds could be acknowledged without its parent, so it comes again on the next run.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import queue
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import multipipes

from changefeed._speedups import Lines
from changefeed.delivery import WAIT_STEP, Output, SinkWait, StopTimeout
from changefeed.errors import PipelineError
from changefeed.pipelines._crossing import _Chunk
from changefeed.pipelines._sink_thread import SLOW_SINK
from changefeed.pipelines._steps import (
    _Entry,
    _Failure,
    _Segment,
    _SinkStep,
    changes_in,
    freeze_heap,
    thaw_heap,
)
from changefeed.pipelines._workers import _log_failure, _Worker, _WorkerNode
from changefeed.pipelines.stages import BatchPolicy, Stage

log = logging.getLogger("changefeed.pipelines")

IDLE_WAIT = 0.005
"""How long an idle feed that cannot wait on its source (`ChangeFeed.wait_for_source`) waits
for busy workers before it sends them what it took."""

def _readable(reader: multiprocessing.connection.Connection) -> Callable[[float], bool]:
    """Whether ``reader`` has something to read, waiting up to the seconds given: one
    ``poll`` system call on a poll object made once (the connection's own ``poll`` builds a
    selector on every call), or that ``poll`` where ``select.poll`` is missing (Windows)."""
    if not hasattr(select, "poll"):
        return reader.poll
    poller = select.poll()
    poller.register(reader.fileno(), select.POLLIN)
    return lambda seconds: bool(poller.poll(seconds * 1000))


class PipelineParts(Protocol):
    """What a multi-process output needs of its pipeline (`Pipeline` has it)."""

    feed: Any
    sink: Any
    dead_letter: Any
    policy: BatchPolicy
    _groups: list[list[Stage]]
    _workers: list[int]


class MultiProcessOutput(Output):
    """The feed's side of a multi-process pipeline: sends chunks, confirms what comes back."""

    def __init__(self, pipeline: PipelineParts) -> None:
        policy = pipeline.policy
        keep = pipeline.dead_letter is not None
        self.feed = pipeline.feed
        self.segment = _Segment(pipeline._groups[0], keep_change=keep,
                                dead_letter=pipeline.dead_letter)
        self.keep_change = keep
        groups = pipeline._groups[1:]
        self.workers = []
        for index, (stages, copies) in enumerate(zip(groups, pipeline._workers[1:], strict=True)):
            last = index == len(groups) - 1
            sink_step = _SinkStep(pipeline.sink, pipeline.dead_letter, policy) if last else None
            self.workers.append(_Worker(_Segment(stages, keep, pipeline.dead_letter), sink_step,
                                        copies))
        self.chunk_size = policy.size
        self.seconds = policy.seconds
        # Enough chunks in flight for every copy of a process to have one, and the next.
        self.max_in_flight = max(4, 2 * max(pipeline._workers)) * policy.size
        self.chunk: list[Any] = []
        """The changes taken since the last send."""
        self.chunk_lines = 0
        """How many more changes than items ``chunk`` holds (in batches of `Lines`)."""
        self.chunk_started = 0.0
        self.sent = 0
        self.confirmed = 0
        self.chunks_sent = 0
        """How many chunks were sent: the next one's ``seq``."""
        self.unconfirmed: deque[int] = deque()
        """For each chunk sent and not confirmed yet, ``sent`` once it went."""
        self.queued_enough = max(pipeline._workers) + 1
        """Chunks in flight at which an idle feed holds the next one while the source sends:
        one for each copy of the busiest process to work on, and one queued behind them."""
        self.last_alive_check = time.monotonic()
        self.last_progress = time.monotonic()
        """When the workers last confirmed something (or were given work while idle)."""
        self.waiting = SinkWait(self.feed)

    def open(self) -> None:
        freeze_heap()  # also before the fork, as the gc module advises
        self.inqueue = multipipes.Pipe()
        self.outqueue = multipipes.Pipe()
        self.nodes = [
            _WorkerNode(
                target=worker,
                name=worker.__name__,
                timeout=0.1 if worker.sink_step is not None else None,
                number_of_processes=worker.copies,
            )
            for worker in self.workers
        ]
        self.mp_pipeline = multipipes.Pipeline([self.inqueue, *self.nodes, self.outqueue])
        # The pipe the confirmations come through, to wait on with the source's socket.
        reader = self.outqueue._reader  # type: ignore[attr-defined]
        self.confirmations = reader.fileno()
        self.confirmations_ready = _readable(reader)
        try:
            self.mp_pipeline.start()  # before the feed connects: the workers share no socket
        except BaseException:
            thaw_heap()  # no run, so no close()
            raise

    def put(self, change: Any) -> None:
        chunk = self.chunk
        if not chunk:
            self.chunk_started = time.monotonic()
        chunk.append(change)
        if change.__class__ is Lines:  # a batch of the feed's own lines (`prefer_lines`)
            self.chunk_lines += change.count - 1
        full = len(chunk) + self.chunk_lines >= self.chunk_size
        if full or time.monotonic() - self.chunk_started >= self.seconds:
            # A chunk that waited its batch's time (held while the workers were busy) is
            # delivered at once: the sink's process would otherwise start its wait anew.
            self._send(flush=not full)
            # Confirmations only follow sends: polling the queue costs ~6 µs, more than
            # decoding a change, so poll per chunk (and on idle ticks).
            self._drain()

    def idle(self) -> None:
        if self.chunk:
            self._receive(0.0)
            if len(self.unconfirmed) >= self.queued_enough and self._source_first():
                # The workers are busy and have the next chunk queued already, and the source
                # sent more: read it into this chunk, which goes at the next idle moment one of
                # those is confirmed (or once full). Chunks grow to what the workers take per
                # wake-up instead of one per read, the feed never sits idle while the source
                # has more, and a worker that is done never waits for the feed's next send.
                return
            self._send(flush=True)
        # Caught up with the source. If the workers are slow, wait for them here, where
        # keep_alive() answers the source (a PostgreSQL shutdown waits for a client that keeps
        # answering from its stream loop with changes undelivered).
        slow = time.monotonic() - self.last_progress >= SLOW_SINK
        self._drain(until_all=slow and self.sent > self.confirmed)

    def finish(self) -> None:
        self._send(flush=True)
        self._drain(until_all=True)

    def close(self, clean: bool) -> None:
        try:
            if clean:
                self.mp_pipeline.poison_pill()
            else:
                self._terminate()
        finally:
            thaw_heap()

    def _send(self, flush: bool) -> None:
        """Run this process's stages on the chunk taken and send it on; raise a stage's
        failure once the workers delivered what came before it."""
        changes, self.chunk = self.chunk, []
        count = len(changes) + self.chunk_lines  # how many changes the chunk stands for
        self.chunk_lines = 0
        failure = None
        if not self.segment.stages:  # nothing to run here: the changes are packed as they are
            chunk = _Chunk.of_changes(changes, self.keep_change, flush)
        else:
            entries, failure = self.segment.process(
                [_Entry(change, self.keep_change) for change in changes])
            chunk = _Chunk(entries, flush or failure is not None, failure=failure)
            if failure is not None:
                count = changes_in(entries)
        if count or flush or failure is not None:
            if self.sent == self.confirmed:
                self.last_progress = time.monotonic()
            chunk.seq = self.chunks_sent
            self.chunks_sent += 1
            if count:  # nothing to confirm otherwise
                self.unconfirmed.append(self.sent + count)
            self.inqueue.put(chunk)  # a failure with it: raised after its entries
            self.sent += count
        if failure is not None:
            _log_failure(failure.message, failure.cause)
            try:
                self._drain(until_all=True, expect_failure=True)  # raises the failure
            except StopTimeout:  # a stop gave up waiting for it
                raise PipelineError(failure.message) from None

    def _source_first(self) -> bool:
        """Wait until the workers confirm what they hold or the source sends more, whichever
        comes first (at most `WAIT_STEP`: the chunk then goes anyway); True if the source did
        while the workers still hold enough. One wait on both (`ChangeFeed.wait_for_source`), no
        fixed sleep: a live stream's chunk goes the moment the workers are free. A feed that
        cannot wait on its source gives the workers `IDLE_WAIT` instead."""
        wait = getattr(self.feed, "wait_for_source", None)
        source = wait(WAIT_STEP, self.confirmations) if wait is not None else None
        if source is None:
            self._receive(IDLE_WAIT)
            return False
        self._receive(0.0)
        return source and len(self.unconfirmed) >= self.queued_enough

    def _drain(self, until_all: bool = False, expect_failure: bool = False) -> None:
        """Handle the confirmations that arrived; wait while too much is in flight, or (with
        ``until_all``) until everything sent is confirmed (`SinkWait`: the source is answered
        meanwhile, and a stop waits a few seconds at most)."""

        def settled() -> bool:
            in_flight = self.sent - self.confirmed
            return not (until_all and (in_flight > 0 or expect_failure)) and (
                in_flight <= self.max_in_flight
            )

        self._receive(0.0)
        if settled():
            # Notice a dead worker within a second, also while the feed is idle.
            if time.monotonic() - self.last_alive_check >= 1.0:
                self._check_alive()
            return

        def done(seconds: float) -> bool:
            self._receive(seconds)
            if settled():
                return True
            self._check_alive()
            return False

        self.waiting.until(done)

    def _receive(self, timeout: float) -> None:
        """Confirm what the workers sent back, waiting up to ``timeout`` seconds for the first;
        raise a worker's failure."""
        # One poll of the pipe first: the queue's own check of it builds a selector each
        # time (~3,000 empty checks per 200,000 changes, more than the messages themselves).
        ready = self.confirmations_ready
        if not ready(timeout):
            return
        outqueue = self.outqueue
        try:
            while True:
                message = outqueue.get_nowait()
                if isinstance(message, _Failure):
                    raise message.error()
                self.confirmed += message.count
                unconfirmed = self.unconfirmed
                while unconfirmed and unconfirmed[0] <= self.confirmed:
                    unconfirmed.popleft()
                self.last_progress = time.monotonic()
                self.confirm(message.position, message.count)
                if not ready(0.0):
                    return
        except queue.Empty:
            pass

    def _terminate(self) -> None:
        """End every worker now (after a failure): SIGTERM, then SIGKILL what lingers."""
        # What the queues still hold is dropped with the workers: their feeder threads must not
        # hold up this process's exit, writing to a pipe no worker reads any more (full when a
        # worker died while chunks kept coming).
        for pipe in (self.inqueue, self.outqueue):
            pipe.cancel_join_thread()
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
                    which = (f"one of the {len(node.processes)} processes" if
                             len(node.processes) > 1 else "the process")
                    raise PipelineError(
                        f"{which} running {node.name} (pid {process.pid}) died with exit"
                        f" code {process.exitcode}; {self.sent - self.confirmed} changes were not"
                        " confirmed and are not acknowledged"
                    )
