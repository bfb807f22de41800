"""`RethinkChangeFeed`: the thin I/O loop over a ``table.changes()`` cursor.

Decoding is `events.decode_change`, the choice between a plain stream, a snapshot and a re-read
is `events.StreamHistory`, connecting and the queries are in `connection`: what is left here is
reading the cursor, filtering by the operation mask, ticking while nothing comes, and logging
what a re-read means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import rethinkdb.net
from rethinkdb.errors import ReqlCursorEmpty, ReqlTimeoutError

from changefeed.backends.rethinkdb.connection import (
    ConnectionParams,
    close_quietly,
    open_changes,
    open_connection,
    read_primary_key,
    split_table,
)
from changefeed.backends.rethinkdb.errors import is_transient_error
from changefeed.backends.rethinkdb.events import (
    READY,
    StreamHistory,
    StreamPlan,
    decode_change,
    make_position,
)
from changefeed.change import ALL, Change, Position
from changefeed.errors import ConfigurationError, TransientBackendError
from changefeed.feed import ChangeFeed

log = logging.getLogger("changefeed.rethinkdb")


class RethinkChangeFeed(ChangeFeed):
    """Changes of one RethinkDB table, through ``table.changes()``.

    RethinkDB cannot resume a changefeed: after a reconnect the feed re-reads the table and
    emits its rows as snapshot inserts (see `changefeed.backends.rethinkdb`), so consumers
    must upsert by primary key.

    Args:
        table: ``"db.table"``, or ``"table"`` in the connection's database.
        operation: the operations to emit (`Operation` flags). Snapshot and re-sync rows are
            emitted whatever the mask.
        prefeed: an iterable replayed first, or ``"snapshot"``: the table's rows as snapshot
            inserts, then its changes, without gap.
        connection: a ``rethinkdb://[user:password@]host[:port][/db]`` URL (port 28015 and
            database ``test`` by default), or an open driver connection (reconnected when it
            dropped, never closed by the feed).
        resync: re-read the table after a reconnect or restart (see above).
        poll_interval: seconds to wait for a change before yielding an idle tick.
        queue_size: the server's ``changefeed_queue_size`` (changes it buffers for a slow
            feed before dropping them, which forces a re-sync); None for the server's default.
        Other arguments as for `ChangeFeed`.
    """

    supports_snapshot = True
    resume = "resync"

    def __init__(
        self,
        table: str,
        operation: int = ALL,
        *,
        prefeed: Any = None,
        connection: Any = None,
        resync: bool = True,
        poll_interval: float = 0.5,
        queue_size: int | None = None,
        **options: Any,
    ) -> None:
        if isinstance(connection, str) or connection is None:
            self.params = ConnectionParams.from_url(connection or "rethinkdb://")
            self._given: Any = None
        elif isinstance(connection, rethinkdb.net.Connection):
            self.params = ConnectionParams.of_connection(connection)
            self._given = connection
        else:
            raise ConfigurationError(
                f"cannot use a {type(connection).__name__} as a RethinkDB connection"
            )
        self.db, self.table_name = split_table(table, self.params.db)
        super().__init__(
            f"{self.db}.{self.table_name}", operation, prefeed=prefeed, connection=connection,
            **options,
        )
        self.resync = resync
        self.poll_interval = poll_interval
        self.queue_size = queue_size
        self.stats.extra.setdefault("resyncs", 0)
        self._history = StreamHistory(
            snapshot=self.prefeed == "snapshot",
            resync=resync,
            restarted=self.acknowledged is not None,  # an earlier run delivered changes
        )
        self._conn: Any = None
        self._cursor: Any = None

    # -- the stream ----------------------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        history = self._history
        plan = history.next_stream()
        if self._conn is None:
            self._conn = open_connection(self.params, self._given)
        self.mark_connected()
        primary_key = read_primary_key(self._conn, self.db, self.table_name, self.params.where)
        self._cursor = cursor = open_changes(
            self._conn, self.db, self.table_name,
            include_initial=plan.include_initial, queue_size=self.queue_size,
        )
        run = history.stream_opened(int(time.time() * 1000))
        self._log_opened(plan)

        table, mask, snapshot_meta = self.table, self.operation, plan.snapshot_meta
        wait = self.poll_interval
        read = cursor.next
        seq = 0
        initial_rows = 0
        reading = plan.include_initial
        monotonic = time.monotonic
        last_yield = monotonic()

        # The hot loop: one iteration per document.
        while True:
            try:
                doc = read(wait=wait)
            except ReqlTimeoutError:
                yield None
                last_yield = monotonic()
                continue
            except ReqlCursorEmpty as exc:  # a StopIteration: must not escape a generator
                raise TransientBackendError(f"the RethinkDB changefeed of {table} ended") from exc
            seq += 1
            event = decode_change(
                doc, table, primary_key, position=make_position(run, seq),
                snapshot_meta=snapshot_meta,
            )
            if event.__class__ is Change:
                if event.snapshot:
                    initial_rows += 1
                    yield event
                    last_yield = monotonic()
                    continue
                if event.operation & mask:
                    yield event
                    last_yield = monotonic()
                    continue
            elif reading and event == READY:
                reading = False
                history.initial_read_done(plan)
                self._log_read_done(plan, initial_rows)
            # Nothing for the consumer: still tick while changes outside the mask stream in.
            if monotonic() - last_yield >= wait:
                yield None
                last_yield = monotonic()

    def _log_opened(self, plan: StreamPlan) -> None:
        if plan.changes_lost:
            log.warning("changes to %s made while the feed was disconnected are lost: RethinkDB"
                        " cannot resume a changefeed and resync is off", self.table)
        elif plan.resync is not None:
            log.info("re-reading %s: RethinkDB cannot resume a changefeed", self.table)
        elif plan.include_initial:
            log.info("snapshot of %s: reading", self.table)

    def _log_read_done(self, plan: StreamPlan, rows: int) -> None:
        if plan.resync is not None:
            self.stats.extra["resyncs"] = self._history.resyncs
            log.warning(
                "re-synced %s: re-read %d rows and emitted them as snapshot"
                " inserts (RethinkDB cannot resume a changefeed; consumers must upsert by key)",
                self.table, rows,
            )
        else:
            log.info("snapshot of %s: %d rows", self.table, rows)

    # -- the rest of the backend interface -----------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        """See `is_transient_error`."""
        return is_transient_error(exc)

    def on_acknowledge(self, position: Position) -> None:
        """Nothing to tell: RethinkDB keeps no position of a changefeed."""

    def close(self) -> None:
        """Close the cursor, and the connection if the feed opened it."""
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            close_quietly(cursor)
        conn, self._conn = self._conn, None
        if conn is not None and conn is not self._given:
            close_quietly(conn, noreply_wait=False)

    def __repr__(self) -> str:
        return f"RethinkChangeFeed({self.table!r}, {self.operation!r}, resync={self.resync!r})"
