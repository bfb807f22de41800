"""The units of work of a pipeline and the steps that handle them (shared by both modes).

An `_Entry` is one change on its way: its position, the items the stages made of it so far,
and (with a dead-letter sink) the change itself. A `_Segment` runs consecutive stages on
entries; a `_SinkStep` groups entries into batches and delivers them, and reports the last
position of each delivered batch as `_Confirmed`. See `changefeed.pipelines.pipeline`; how
entries cross between processes is `_crossing`'s.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

from changefeed._speedups import Lines
from changefeed.change import Change, Position, Truncate
from changefeed.errors import ChangefeedError, PipelineError
from changefeed.pipelines.sinks import (
    Batch,
    ItemsRejected,
    SinkInterrupted,
    SinkUnavailable,
    as_sink,
)
from changefeed.pipelines.stages import BatchPolicy, Stage, apply_stage, stage_name

log = logging.getLogger("changefeed.pipelines")



class _Entry:
    """One change on its way: its position, the items made of it so far, dead letters.

    An entry of a batch of lines the feed wrote itself (`Lines`: asked for with
    `ChangeFeed.prefer_lines` by whoever built the stages, only when they would make those very
    lines and no dead letters are wanted) stands for the ``count`` changes it holds: the stages
    pass it by, and the sink writes it as it is (`changes_in`)."""

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
                "change": change.to_dict() if isinstance(change, (Change, Truncate)) else change,
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

    @property
    def reader_gone(self) -> bool:
        """The sink wrote to a pipe whose reader went away (``changefeed run ... | head``)."""
        return isinstance(self.cause, BrokenPipeError)

    def error(self) -> PipelineError:
        """The error the feed's process raises (a reader gone keeps its BrokenPipeError)."""
        error = PipelineError(self.message)
        error.__cause__ = self.cause
        return error

    def __getstate__(self) -> tuple[str, bool]:  # the cause stays behind: it may not pickle
        return self.message, self.reader_gone

    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.message = state[0]
        self.cause = BrokenPipeError() if state[1] else None


def freeze_heap() -> None:
    """Put what the process holds when a pipeline starts (its modules, the feed) out of the
    cyclic collector's sight for the run (`thaw_heap` at its end): each full collection would
    walk all of it again, and changes in flight, promoted while they wait for a sink or a
    queue, trigger many (measured: half a pipeline's CPU on 200,000 changes). Objects still
    die by reference counting; frozen cyclic garbage waits until the thaw. Before a fork it
    also keeps the workers from copying those pages (as the `gc` module advises)."""
    gc.freeze()


def thaw_heap() -> None:
    """Give the collector back what `freeze_heap` hid."""
    gc.unfreeze()


class _Confirmed:
    """The sink delivered ``count`` more changes; ``position`` is the last one's (or None)."""

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
    """Consecutive stages run in one process, on a batch of entries at a time.

    Each stage takes the whole batch before the next one does. A stage with an ``each`` method
    (``--where``'s `RowWhere`, the format's `EncodeLines`: single items in, single items or
    None out) gets the batch in one call, compiled where it can be; any other is called per
    item. These stages are pure, so when ``each`` raises, the batch is run again one item at a
    time to find the change that failed, which then fails (or is dead-lettered) as it would
    alone: the entries before it are returned with the failure, and no stage runs on the ones
    after it.
    """

    def __init__(self, stages: Sequence[Stage], keep_change: bool, dead_letter: Any) -> None:
        self.stages = [(stage, stage_name(stage), getattr(stage, "each", None))
                       for stage in stages]
        self.keep_change = keep_change
        self.dead_letter = dead_letter is not None

    def process(self, entries: list[_Entry]) -> tuple[list[_Entry], _Failure | None]:
        """Run the stages on the entries; on a failure without dead letters, return the
        entries before the failed one and the failure."""
        if not self.stages:
            return entries, None
        failure: _Failure | None = None
        # The entries that still have items for the next stage (the feed's lines are made).
        live = [entry for entry in entries
                if entry.items and entry.items[0].__class__ is not Lines]
        for stage, name, each in self.stages:
            live = [entry for entry in live if entry.items]
            if not live:
                break
            if each is not None and all(len(entry.items) == 1 for entry in live):
                try:
                    results = each([entry.items[0] for entry in live])
                except Exception:
                    results = None  # found one at a time below
                if results is not None and len(results) == len(live):
                    for entry, result in zip(live, results, strict=True):
                        entry.items = [] if result is None else [result]
                    continue
            for index, entry in enumerate(live):
                items = entry.items
                try:
                    if len(items) == 1:
                        items = apply_stage(stage, items[0])
                    else:
                        items = [out for item in items for out in apply_stage(stage, item)]
                except Exception as exc:
                    if self.dead_letter:
                        log.warning("stage %s failed at position %r: %s", name, entry.position, exc)
                        entry.dead_letter(name, exc)
                        continue
                    message = (
                        f"stage {name} failed on the change at position {entry.position!r}:"
                        f" {_describe(exc)}"
                    )
                    failure = _Failure(message, exc)
                    entries = entries[:_index_of(entries, entry)]
                    live = live[:index]
                    break
                entry.items = items
        return entries, failure


def changes_in(entries: list[_Entry]) -> int:
    """How many changes ``entries`` stand for (a `Lines` entry for each of its lines)."""
    count = len(entries)
    for entry in entries:
        items = entry.items
        if items and items[0].__class__ is Lines:
            count += items[0].count - 1
    return count


def _index_of(entries: list[_Entry], entry: _Entry) -> int:
    for index, one in enumerate(entries):
        if one is entry:
            return index
    raise ValueError("not an entry of the batch")


class _SinkStep:
    """Groups entries into batches, delivers them, and says which positions are confirmed."""

    def __init__(self, sink: Any, dead_letter: Any, policy: BatchPolicy) -> None:
        self.name = stage_name(sink)
        self.sink = as_sink(sink, lists=policy.explicit)
        self.dead_letter = as_sink(dead_letter) if dead_letter is not None else None
        self.dead_letter_name = stage_name(dead_letter) if dead_letter is not None else ""
        self.policy = policy
        self.entries: list[_Entry] = []
        self.items = 0
        self.started = 0.0

    def add(self, entries: list[_Entry], since: float | None = None) -> None:
        """Add ``entries`` to the waiting batch; ``since``: when the first of them was taken
        (for the batch's age), if not now."""
        if not entries:
            return
        if not self.entries:
            self.started = time.monotonic() if since is None else since
        self.entries.extend(entries)
        items = 0
        for entry in entries:
            made = entry.items
            items += made[0].count if made and made[0].__class__ is Lines else len(made)
        self.items += items

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
        return self.deliver(self.take())

    def take(self) -> list[_Entry]:
        """The waiting entries, handed out for delivery; the step starts a new batch."""
        entries = self.entries
        self.entries = []
        self.items = 0
        return entries

    def deliver(self, entries: list[_Entry]) -> _Confirmed | None:
        """Deliver ``entries`` (items, then dead letters); None when there were none.

        Raises `PipelineError` when the sink fails without a dead-letter sink, and
        `SinkInterrupted` (never dead-lettered: the batch is simply not confirmed) when a
        sink gave up because the pipeline is stopping.
        """
        if not entries:
            return None
        items: list[Any] = []
        positions: list[Position] = []
        owners: list[_Entry] = []
        changes = len(entries)  # each a change, but a batch of lines stands for its lines
        for entry in entries:
            for item in entry.items:
                items.append(item)
                positions.append(entry.position)
                owners.append(entry)
                if item.__class__ is Lines:
                    changes += item.count - 1
        if items:
            try:
                self.sink.write_batch(Batch(items, positions))
            except SinkInterrupted:
                raise
            except ItemsRejected as exc:  # the rest was delivered: only these are dead letters
                message = f"sink {self.name} rejected changes: {exc.message}"
                if self.dead_letter is None:
                    raise PipelineError(message) from exc
                log.warning("%s", message)
                for entry in {id(owners[i]): owners[i] for i in exc.rejected}.values():
                    entry.dead_letter(self.name, exc)
            except Exception as exc:
                where = (
                    f"position {positions[0]!r}"
                    if positions[0] == positions[-1]
                    else f"positions {positions[0]!r}..{positions[-1]!r}"
                )
                message = f"sink {self.name} failed on the batch at {where}: {_describe(exc)}"
                if self.dead_letter is None or isinstance(exc, SinkUnavailable):
                    raise PipelineError(message) from exc
                log.warning("%s", message)
                for entry in entries:
                    if entry.items:
                        entry.dead_letter(self.name, exc)
        dead = [(record, entry.position) for entry in entries for record in entry.dead]
        if dead:
            try:
                assert self.dead_letter is not None  # entries are dead-lettered only with one
                self.dead_letter.write_batch(Batch([r for r, _ in dead], [p for _, p in dead]))
            except SinkInterrupted:
                raise
            except Exception as exc:
                raise PipelineError(
                    f"dead-letter sink {self.dead_letter_name} failed: {_describe(exc)}"
                ) from exc
        last = next((e.position for e in reversed(entries) if e.position is not None), None)
        return _Confirmed(last, changes)

    def interrupt(self) -> None:
        """Tell the sinks that can give up a batch (``interrupt()``) to do so: we stop."""
        for sink in (self.sink, self.dead_letter):
            if sink is not None:
                sink.interrupt()

    def close(self) -> None:
        for sink in (self.sink, self.dead_letter):
            if sink is not None:
                sink.close()

