"""The worker processes of `changefeed.pipelines.Pipeline`'s multi-process mode (see
`_processes`): what runs inside each one (`_Worker`: a segment of stages, and the sink in the
last), and how a worker leaves Ctrl-C to the feed's process and dies with it (`_WorkerNode`,
`_exit_with_parent`).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Any

import multipipes

from changefeed.errors import ChangefeedError, PipelineError
from changefeed.pipelines._crossing import InOrder, _Chunk
from changefeed.pipelines._steps import _Failure, _Segment, _SinkStep

log = logging.getLogger("changefeed.pipelines")


def _log_failure(message: str, cause: BaseException | None) -> None:
    """Log the traceback of an unexpected failure (a bug in a stage), which stays in the process
    it happened in; the feed's process raises the failure itself, and a command says it in one
    line, so an expected one (a sink's own error, a full disk) is not logged here."""
    if cause is not None and not isinstance(cause, (ChangefeedError, OSError)):
        log.error("%s", message, exc_info=cause)
    else:
        log.debug("%s", message, exc_info=cause)


class _Worker:
    """The target of one worker process: a segment of stages, and the sink step if last.

    With ``copies`` > 1 the process runs in that many copies, each taking the next chunk from a
    shared queue, which it passes on with its ``seq``. A single process (the sink's, always)
    takes chunks in the feed's order (`InOrder`), so it runs and writes nothing out of order;
    a stage's failure travels with the chunk it ended (`_Chunk.failure`) and is raised after
    the entries before it, so nothing after it is written or confirmed."""

    def __init__(self, segment: _Segment, sink_step: _SinkStep | None, copies: int = 1) -> None:
        self.segment = segment
        self.sink_step = sink_step
        self.copies = copies
        self.in_order = InOrder() if copies == 1 else None
        self.failed = False
        self.__name__ = "+".join(name for _, name, _ in segment.stages) or (
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
        if message is None:  # no input for a while: deliver a batch that has waited
            if sink_step is not None and sink_step.due(time.monotonic()):
                yield from self._flush()
            return
        chunks = [message] if self.in_order is None else self.in_order.add(message)
        for chunk in chunks:
            yield from self._chunk(chunk)
            if self.failed:
                return

    def _flush(self) -> Any:
        try:
            confirmed = self.sink_step.flush()  # type: ignore[union-attr]
            if confirmed is not None:
                yield confirmed
        except PipelineError as exc:
            yield self._failed(_Failure(exc.message, exc.__cause__), seq=None)

    def _chunk(self, chunk: _Chunk) -> Any:
        sink_step = self.sink_step
        try:
            entries, failure = self.segment.process(chunk.entries)
            if failure is not None:
                _log_failure(failure.message, failure.cause)
            else:
                failure = chunk.failure  # a failure before this process: after its entries
            if sink_step is None:
                if failure is not None:
                    self._stop()
                yield _Chunk(entries, chunk.flush or failure is not None, chunk.seq, failure)
                return
            sink_step.add(entries)
            if failure is not None or chunk.flush or sink_step.due(time.monotonic()):
                confirmed = sink_step.flush()
                if confirmed is not None:
                    yield confirmed
            if failure is not None:
                self.failed = True
                yield failure
        except PipelineError as exc:
            yield self._failed(_Failure(exc.message, exc.__cause__), chunk.seq)

    def _failed(self, failure: _Failure, seq: int | None) -> Any:
        """What this process sends on after its sink (or a stage's bookkeeping) failed."""
        if not failure.reader_gone:  # a reader that went away is no error to report
            _log_failure(failure.message, failure.cause)
        self._stop()
        if self.sink_step is None and seq is not None:
            return _Chunk([], True, seq, failure)
        return failure

    def _stop(self) -> None:
        """Take no more chunks after a failure, in a single process: what comes next follows
        the failure. A copy goes on: a chunk it takes next may come before the failed one (from
        copies before it, in any order), and the next single process drops what follows."""
        if self.in_order is not None:
            self.failed = True

    def close(self) -> None:
        if self.sink_step is not None:
            self.sink_step.close()


PARENT_GONE_EXIT = 70
"""The exit code of a worker that ended because the feed's process went away."""


def _exit_with_parent(name: str) -> None:
    """End this worker process as soon as the process that started it is gone.

    The parent's sentinel, which `multiprocessing` gives every child on every platform and
    start method, is what is watched: a pipe whose only writers are the parent (and, under
    ``fork``, workers started after this one, which watch their own and go first), so it reads
    EOF when the parent dies however it dies; on Windows, the parent's process handle. Linux's
    ``PR_SET_PDEATHSIG`` would be simpler but fires when the *thread* that started the worker
    ends (a pipeline opened from a short-lived thread would lose its workers), exists on Linux
    only, and has a race with a parent that dies before it is set.
    """
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child (a pipeline stepped in-process)
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        log.warning("the feed's process (pid %s) went away: worker %s stops; what it had not"
                    " delivered is not acknowledged and comes again", parent.pid, name)
        os._exit(PARENT_GONE_EXIT)  # at once: nothing may be confirmed to a dead parent

    threading.Thread(target=watch, name="changefeed-parent-watch", daemon=True).start()


class _WorkerNode(multipipes.Node):
    """A multipipes node that leaves Ctrl-C to the feed's process, closes its sinks, and dies
    with the feed's process."""

    def run_forever(self) -> None:
        # A terminal's Ctrl-C reaches the whole process group; the feed's process decides how
        # to stop (deliver, acknowledge, then send poison pills), so workers ignore it. SIGTERM
        # gets its default back: a handler forked from the feed's process would swallow the
        # terminate() that ends a failed pipeline.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # What the worker inherited from the feed's process is never garbage here: out of the
        # collector's sight, a collection does not walk it (nor copy its pages on write).
        gc.freeze()
        _exit_with_parent(self.name)
        try:
            super().run_forever()
        finally:
            self.target.close()
