"""Test helpers users import: an in-memory feed and a list sink.

    >>> from changefeed import testing
    >>> feed = testing.MemoryFeed("tasks", changes=[testing.insert("tasks", {"id": 1})])
    >>> sink = testing.ListSink()
    >>> for change in feed.changes():
    ...     sink(change)
    >>> [c.new for c in sink.items]
    [{'id': 1}]
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterable, Iterator
from typing import Any

from changefeed.change import ALL, Change, Operation
from changefeed.feed import ChangeFeed


def insert(table: str, row: dict[str, Any], **fields: Any) -> Change:
    """A `Change` inserting ``row`` into ``table``."""
    return Change(Operation.INSERT, table, new=row, **fields)


def update(table: str, new: dict[str, Any], old: dict[str, Any], **fields: Any) -> Change:
    """A `Change` updating ``old`` to ``new`` in ``table``."""
    return Change(Operation.UPDATE, table, new=new, old=old, **fields)


def delete(table: str, old: dict[str, Any], **fields: Any) -> Change:
    """A `Change` deleting ``old`` from ``table``."""
    return Change(Operation.DELETE, table, new=None, old=old, **fields)


class MemoryFeed(ChangeFeed):
    """A feed over changes held in memory, with integer positions 1, 2, 3, ...

    It behaves like a real backend: it emits only the operations asked for, resumes after the
    acknowledged position, and (with ``endless=True``) waits for `push()` instead of ending.
    """

    def __init__(
        self,
        table: str = "memory",
        operation: int = ALL,
        *,
        changes: Iterable[Change] = (),
        endless: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(table, operation, **options)
        self.log: list[Change] = []
        self.endless = endless
        self._incoming: queue.SimpleQueue[Change] = queue.SimpleQueue()
        for change in changes:
            self.push(change)

    def push(self, change: Change) -> None:
        """Append ``change`` to the feed (thread-safe); it gets the next position."""
        self._incoming.put(change)

    def _drain(self, wait: float) -> None:
        try:
            change = self._incoming.get(timeout=wait) if wait else self._incoming.get_nowait()
            while True:
                if change.position is None:
                    change = dataclasses.replace(change, position=len(self.log) + 1)
                self.log.append(change)
                change = self._incoming.get_nowait()
        except queue.Empty:
            pass

    def run_changefeed(self) -> Iterator[Change | None]:
        self.mark_connected()  # nothing to reach: the log is in memory
        self._drain(0)
        index = self._start_index()
        while True:
            while index < len(self.log):
                change = self.log[index]
                index += 1
                if change.operation & self.operation:
                    yield change
            if not self.endless:
                return
            before = len(self.log)
            self._drain(0.2)
            if len(self.log) == before:
                yield None

    def _start_index(self) -> int:
        if self.acknowledged is None:
            return 0
        for index, change in enumerate(self.log):
            if change.position == self.acknowledged:
                return index + 1
        return 0


class ListSink:
    """A sink that keeps what it receives in ``items`` (and can be told to fail)."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.__name__ = "list_sink"  # multipipes names its nodes after their target

    def __call__(self, item: Any) -> None:
        self.items.append(item)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:  # an empty sink is still a sink (multipipes tests truthiness)
        return True
