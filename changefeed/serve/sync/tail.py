"""Reading the shape log, in every ``serve`` process: the recent entries in memory, the rest and
the snapshots from PostgreSQL.

`LogReader` listens on the log's channel (the feeder NOTIFYs after each batch) and reads the new
entries into memory, where every live request and stream of this process finds them: a change
reaches a thousand waiting clients from one read. Requests for offsets older than memory read
the ``log`` table; snapshots read ``rows`` together with the head in one REPEATABLE READ
transaction, so the rows are exactly the state at that offset. All I/O is async (psycopg's
async connections and a small pool).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from changefeed.errors import first_line
from changefeed.serve.sync.log import load_log_json

log = logging.getLogger("changefeed.serve.sync")

POLL_SECONDS = 1.0
"""Without a notification, look for new entries this often (a lost NOTIFY costs no more)."""


class Entry:
    """One logged change (see `changefeed.serve.sync.log`)."""

    __slots__ = ("seq", "table", "key", "op", "new", "old", "xid", "committed_at")

    def __init__(self, seq: int, table: str, key: Any, op: str, new: Any, old: Any, xid: Any,
                 committed_at: datetime | None) -> None:
        self.seq = seq
        self.table = table
        self.key = key
        self.op = op
        self.new = new
        self.old = old
        self.xid = xid
        self.committed_at = committed_at


@dataclass(frozen=True)
class LogState:
    """The log's state as last read: its epoch, head, horizons and loaded tables."""

    epoch: str
    head: int
    log_horizon: int
    tombstone_horizon: int
    loaded: frozenset[str]


_ENTRY_COLUMNS = "seq, tbl, key, op, new, old, xid, committed_at"


async def _configure(conn: psycopg.AsyncConnection) -> None:
    set_json_loads(load_log_json, conn)  # exact digits, any depth (as the log sink wrote them)


class LogReader:
    """The shape log as one process reads it (see the module's notes)."""

    def __init__(self, url: str, schema: str, *, memory_entries: int = 100_000) -> None:
        self.url = url
        self.schema = schema
        self.memory_entries = memory_entries
        self.state: LogState | None = None
        self.floor = 0
        """Every entry after this offset is in memory."""
        self._seqs: dict[str, list[int]] = {}
        self._entries: dict[str, list[Entry]] = {}
        self._count = 0
        self.xids: OrderedDict[int, int] = OrderedDict()
        self._changed: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.pool: AsyncConnectionPool | None = None
        self.connected = False
        self.closing = False

    # -- running -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, read the state, and start following the log."""
        self.pool = AsyncConnectionPool(self.url, min_size=1, max_size=8, open=False,
                                        configure=_configure, kwargs={"autocommit": True})
        await self.pool.open(wait=True, timeout=30)
        async with self.pool.connection() as conn:
            self.state = await self._read_state(conn)
        self.floor = self.state.head
        self._changed = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(), name="changefeed-sync-tail")

    async def close(self) -> None:
        self.closing = True
        self.wake()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.pool is not None:
            await self.pool.close()

    async def _follow(self) -> None:
        while not self.closing:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                await _configure(conn)
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.schema)))
                    self.connected = True
                    await self._catch_up(conn)
                    while not self.closing:
                        async for _ in conn.notifies(timeout=POLL_SECONDS, stop_after=1):
                            pass
                        await self._catch_up(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                if self.closing:
                    return
                log.warning("reading the shape log: %s; reconnecting", first_line(exc))
                await asyncio.sleep(1.0)

    async def _read_state(self, conn: psycopg.AsyncConnection) -> LogState:
        s = sql.Identifier(self.schema)
        cursor = conn.cursor(row_factory=tuple_row)
        await cursor.execute(sql.SQL(
            "SELECT epoch, head, log_horizon, tombstone_horizon,"
            " (SELECT coalesce(array_agg(name), '{{}}') FROM {}.tables WHERE loaded)"
            " FROM {}.state WHERE id = 1").format(s, s))
        row = await cursor.fetchone()
        if row is None:
            raise psycopg.OperationalError(f"the shape log {self.schema} has no state")
        return LogState(row[0], row[1], row[2], row[3], frozenset(row[4]))

    async def _catch_up(self, conn: psycopg.AsyncConnection) -> None:
        """Read the state and every entry after the memory's head."""
        while True:
            state = await self._read_state(conn)
            old = self.state
            if old is not None and state.epoch != old.epoch:
                log.warning("the shape log %s was made anew: forgetting what was in memory",
                            self.schema)
                self._forget(state.head)
                self.state = state
                self.wake()
                return
            head = old.head if old is not None else state.head
            if state.head <= head:
                if old != state:
                    self.state = LogState(state.epoch, max(head, state.head), state.log_horizon,
                                          state.tombstone_horizon, state.loaded)
                    self.wake()
                return
            cursor = conn.cursor(row_factory=tuple_row)
            await cursor.execute(sql.SQL(
                f"SELECT {_ENTRY_COLUMNS} FROM {{}}.log WHERE seq > %s AND seq <= %s"
                " ORDER BY seq LIMIT 10000").format(sql.Identifier(self.schema)),
                [head, state.head])
            rows = await cursor.fetchall()
            for row in rows:
                self._add(Entry(*row))
            reached = rows[-1][0] if len(rows) == 10000 else state.head
            self.state = LogState(state.epoch, reached, state.log_horizon,
                                  state.tombstone_horizon, state.loaded)
            self._trim()
            self.wake()
            if reached >= state.head:
                return

    def _add(self, entry: Entry) -> None:
        if entry.op == "f":  # a fence: every change of its transaction is in memory now
            self.xids[entry.xid] = entry.seq
            if len(self.xids) > 100_000:
                self.xids.popitem(last=False)
            return
        self._seqs.setdefault(entry.table, []).append(entry.seq)
        self._entries.setdefault(entry.table, []).append(entry)
        self._count += 1

    def _trim(self) -> None:
        if self._count <= self.memory_entries:
            return
        # Drop the older half: every entry at or before the new floor leaves memory.
        all_seqs = sorted(seq for seqs in self._seqs.values() for seq in seqs)
        floor = all_seqs[len(all_seqs) // 2]
        for table, seqs in self._seqs.items():
            cut = bisect.bisect_right(seqs, floor)
            del seqs[:cut]
            del self._entries[table][:cut]
        self._count = sum(len(seqs) for seqs in self._seqs.values())
        self.floor = max(self.floor, floor)

    def _forget(self, head: int) -> None:
        self._seqs.clear()
        self._entries.clear()
        self._count = 0
        self.xids.clear()
        self.floor = head

    def wake(self) -> None:
        """Wake every request waiting for the log to change."""
        changed = self._changed
        if changed is not None and not changed.done():
            changed.set_result(None)
        if not self.closing:
            self._changed = asyncio.get_event_loop().create_future()

    async def wait_for_change(self, timeout: float) -> None:
        """Return when the log changed (or the reader closes), or after ``timeout`` seconds."""
        changed = self._changed
        if changed is None or timeout <= 0 or self.closing:
            return
        await asyncio.wait([changed], timeout=timeout)

    async def wait_for_head(self, offset: int, timeout: float) -> bool:
        """Wait until memory holds the log up to ``offset``; False if it did not in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.head < offset:
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closing:
                return False
            await self.wait_for_change(remaining)
        return True

    async def wait_for_xid(self, xid: int, timeout: float) -> bool:
        """Wait until every change of transaction ``xid`` is in memory (its fence is: see
        `changefeed.serve.sync.log.fence_prefix`); False if not in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while xid not in self.xids:
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closing:
                return False
            await self.wait_for_change(remaining)
        return True

    # -- reading -----------------------------------------------------------------------------

    @property
    def head(self) -> int:
        return self.state.head if self.state is not None else 0

    def memory_after(self, table: str, offset: int, limit: int) -> list[Entry]:
        """The entries of ``table`` after ``offset`` (at least `floor`), from memory."""
        seqs = self._seqs.get(table)
        if not seqs:
            return []
        start = bisect.bisect_right(seqs, offset)
        return self._entries[table][start:start + limit]

    async def entries_after(self, table: str, offset: int, limit: int) -> tuple[list[Entry], int]:
        """Up to ``limit`` entries of ``table`` after ``offset``, and the offset they reach (the
        head when they are all there is): from memory, or from ``log`` for older offsets."""
        head = self.head
        if offset >= self.floor:
            entries = self.memory_after(table, offset, limit)
            return entries, (entries[-1].seq if len(entries) == limit else head)
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=tuple_row)
            await cursor.execute(sql.SQL(
                f"SELECT {_ENTRY_COLUMNS} FROM {{}}.log WHERE tbl = %s AND seq > %s"
                " AND seq <= %s ORDER BY seq LIMIT %s").format(sql.Identifier(self.schema)),
                [table, offset, head, limit])
            entries = [Entry(*row) for row in await cursor.fetchall()]
        return entries, (entries[-1].seq if len(entries) == limit else head)

    async def snapshot(self, tables: Sequence[str], owner: tuple[str, str] | None = None,
                       changed_after: int | None = None
                       ) -> tuple[int, dict[str, list[tuple[Any, Any]]]]:
        """The rows (key, row) of each of ``tables`` at one offset, and that offset. ``owner``
        (column, value as text) keeps one owner's rows; ``changed_after`` gives the keys
        changed after that offset instead, deleted ones with row None."""
        assert self.pool is not None
        s = sql.Identifier(self.schema)
        query = sql.SQL("SELECT key, row FROM {}.rows WHERE tbl = %s").format(s)
        extra: list[Any] = []
        if changed_after is not None:
            query += sql.SQL(" AND seq > %s")
            extra.append(changed_after)
        else:
            query += sql.SQL(" AND row IS NOT NULL")
        if owner is not None:
            query += sql.SQL(" AND row->>%s = %s")
            extra += list(owner)
        result: dict[str, list[tuple[Any, Any]]] = {}
        async with self.pool.connection() as conn:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cursor = conn.cursor(row_factory=tuple_row)
                await cursor.execute(sql.SQL("SELECT head FROM {}.state").format(s))
                head_row = await cursor.fetchone()
                assert head_row is not None
                for table in tables:
                    await cursor.execute(query, [table, *extra])
                    result[table] = [(key, row) for key, row in await cursor.fetchall()]
        return head_row[0], result


def tables_loaded(state: LogState | None, tables: Sequence[str]) -> bool:
    """Whether every one of ``tables`` has its snapshot in the log."""
    return state is not None and all(table in state.loaded for table in tables)


__all__ = ["Entry", "LogReader", "LogState", "tables_loaded"]
