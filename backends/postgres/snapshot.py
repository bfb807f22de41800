"""Snapshot prefeeds: the tables' rows handed over to the stream with no gap and no duplicate.

Two ways, chosen by the feed (`PostgresChangeFeed`):

* **Exported snapshot** (any server version, tables without a primary key): the slot is
  created with ``EXPORT_SNAPSHOT`` and the tables are read in that snapshot
  (`exported_rows`), in one long transaction; the stream then continues exactly where the
  read ended.
* **Back-fill in chunks** (PostgreSQL 14+, every table with a primary key): the rows are read
  in key chunks between watermarks written through the slot, while the stream goes on (see
  `backfill`). `backfill_states` says which tables still need one, and `window_changes` turns a
  chunk whose high watermark arrived into snapshot changes positioned in the stream.

Either way the publication's record (see `catalog`) says whether the snapshot was delivered,
so a feed cut short takes it again: the slot alone cannot tell.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.backfill import (
    BACKFILL_PREFIX,
    Backfiller,
    ChunkWindow,
    TableBackfill,
    key_types,
)
from changefeed.backends.postgres.connection import MESSAGES_VERSION
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.loading import (
    TypeLoaders,
    psycopg_loaders,
    query_rows,
    read_rows,
)
from changefeed.backends.postgres.pgoutput import PgOutputDecoder, schema_version
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.tables import Table, WatchedTables
from changefeed.backends.postgres.values import SESSION_SETTINGS
from changefeed.change import Change, Operation, SnapshotState
from changefeed.errors import BackendError, first_line
from changefeed.message import Message

log = logging.getLogger("changefeed.postgres")

PENDING = "pending"
DONE = "done"
"""The snapshot states recorded on the publication (``meta["snapshot"]``)."""

_TYPE = struct.Struct("!Ii")

SnapshotItem = tuple[Table, str | None, dict[str, Any] | str]
"""(table, its schema version, a row or "started" / "done")."""


def exported_rows(
    reader: psycopg.Connection, snapshot_name: str, tables: Iterable[Table],
    batch: int, *, markers: bool = False,
) -> Iterator[SnapshotItem]:
    """Each table's rows in the exported snapshot ``snapshot_name``, loaded by the stream's own
    loaders (the same values as streamed rows), with ``"started"`` and ``"done"`` around each
    table's rows when ``markers`` is set. ``reader``: a fresh autocommit connection."""
    reader.execute(SESSION_SETTINGS)
    loaders = psycopg_loaders(reader, catalog=reader)
    reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
    for table in tables:
        relation = table.identifier
        version = schema_version_of(reader, table.oid)
        total = _estimate(reader, table)
        log.info("snapshot of %s: reading ~%s rows", table.qualified, f"{total:,}")
        if markers:
            yield table, version, "started"
        started = last_report = time.monotonic()
        done = 0
        for row in read_rows(reader, sql.SQL("SELECT * FROM {}").format(relation), loaders,
                             batch):
            done += 1
            yield table, version, row
            now = time.monotonic()
            if now - last_report >= 2.0:
                last_report = now
                log.info("snapshot of %s: %s / ~%s rows (%.0f rows/s)", table.qualified,
                         f"{done:,}", f"{max(total, done):,}", done / (now - started))
        log.info("snapshot of %s: %s rows done", table.qualified, f"{done:,}")
        if markers:
            yield table, version, "done"
    reader.execute("COMMIT")


def _estimate(reader: psycopg.Connection, table: Table) -> int:
    """Rows in the table (a partitioned one: the sum of its partitions) by the statistics;
    counted in the same snapshot when never analysed."""
    with reader.cursor(row_factory=tuple_row) as cursor:
        row = cursor.execute(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint"
            " FROM pg_class c WHERE c.relkind = 'r' AND (c.oid = %s"
            " OR c.oid IN (SELECT relid FROM pg_partition_tree(%s) WHERE isleaf))",
            [table.oid, table.oid],
        ).fetchone()
        if row is not None and row[0]:
            return int(row[0])
        counted = cursor.execute(
            sql.SQL("SELECT count(*) FROM {}").format(table.identifier)
        ).fetchone()
        return int(counted[0]) if counted else 0


def exported_change(item: SnapshotItem, index: int) -> Change | SnapshotState:
    """The snapshot change of an `exported_rows` item, the ``index``-th of the snapshot: it
    sorts before any streamed change (commit LSN 0)."""
    table, version, row = item
    position = PgPosition(0, index)
    if isinstance(row, str):
        return SnapshotState(table.qualified, row, position)
    key = {column: row[column] for column in table.key}
    return Change(Operation.INSERT, table.qualified, row, None, key, position, None, None,
                  True, None, version)


class ExportedChanges:
    """Makes the changes of `exported_rows` items for `ChangeFeed.snapshot_changes`, and
    notes the last one in the ledger: once it is acknowledged, the snapshot is delivered."""

    def __init__(self, ledger: AckLedger) -> None:
        self.ledger = ledger

    def __call__(self, item: SnapshotItem, number: int, last: bool) -> Change | SnapshotState:
        change = exported_change(item, number)
        if last:
            self.ledger.snapshot_last = change.position
        return change


def mark(dsn: str, publication: str, meta: dict[str, Any], state: str) -> None:
    """Record ``state`` of the snapshot in the publication's record ``meta`` (a crash
    mid-snapshot must take it again); a failure is only a warning."""
    meta["snapshot"] = state
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            catalog.write_meta(conn, publication, meta)
    except psycopg.Error as exc:
        log.warning("could not record the snapshot state on %s: %s", publication, exc)


def schema_version_of(conn: psycopg.Connection, oid: int) -> str:
    """The `pgoutput.schema_version` of table ``oid`` as the connection's snapshot sees it:
    the columns pgoutput describes (not dropped, not generated), with type OIDs and modifiers."""
    with conn.cursor(row_factory=tuple_row) as cursor:
        rows = cursor.execute(
            "SELECT attname, atttypid::oid::bigint, atttypmod FROM pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND attgenerated = ''"
            " ORDER BY attnum",
            [oid],
        ).fetchall()
    types = [_TYPE.pack(type_oid, typmod) for _, type_oid, typmod in rows]
    return schema_version([name for name, _, _ in rows], types)


# -- back-fills --------------------------------------------------------------------------------


def in_chunks(server_version: int, tables: Iterable[Table]) -> bool:
    """Whether snapshots go in key chunks through the stream (see `backfill`): when the server
    sends logical messages (14+) and every table has a primary key; else the whole snapshot
    is read in the slot's exported snapshot at creation."""
    return server_version >= MESSAGES_VERSION and all(table.key for table in tables)


def backfill_states(
    meta: dict[str, Any], tables: Iterable[Table]
) -> Iterator[tuple[Table, Any]]:
    """The tables whose snapshot was not delivered on this slot yet, with the recorded state
    of a back-fill cut short (None: from the start)."""
    states = meta.get("backfill") or {}
    legacy_done = meta.get("snapshot") == DONE  # recorded by versions without back-fills
    for table in tables:
        state = states.get(str(table.oid))
        if state == DONE or (state is None and legacy_done):
            continue
        yield table, state


def table_backfill(
    conn: psycopg.Connection, table: Table, name: str, state: Any = None
) -> TableBackfill:
    """The back-fill of ``table`` (streamed as ``name``), continuing after a recorded state."""
    state = state if isinstance(state, dict) else {}
    return TableBackfill(
        table.oid, name, list(table.key), key_types(conn, table.oid, table.key),
        after=state.get("after"), done=state.get("done", 0), chunks=state.get("chunks", 0),
        # A recorded chunk was acknowledged, and the "started" marker before its rows with it.
        announced=state.get("chunks", 0) > 0,
    )


def requested_tables(content: bytes, slot: str) -> list[int]:
    """The table OIDs a `backfill.BACKFILL_PREFIX` message asks ``slot``'s feed to back-fill
    (none when it is for another slot or not readable)."""
    try:
        request = json.loads(content)
    except ValueError:
        return []
    if not isinstance(request, dict) or request.get("slot") != slot:
        return []
    return list(request.get("tables") or [])


def window_changes(
    window: ChunkWindow, table: str, version: str | None, next_position: Callable[[], str],
    *, markers: bool,
) -> tuple[list[Change | SnapshotState], str | None]:
    """A chunk whose high watermark arrived, as snapshot changes of ``table`` positioned in the
    watermark's transaction (``next_position``), with the table's start and end markers where
    they fall; and the position of the chunk's last row (None: it had none)."""
    backfill = window.backfill
    out: list[Change | SnapshotState] = []
    if markers and not backfill.announced:
        out.append(SnapshotState(table, "started", next_position()))
    backfill.announced = True
    positions = [next_position() for _ in window.rows]
    if markers and window.complete:
        positions.append(next_position())
    for row, position in zip(window.rows.values(), positions, strict=False):
        key = {column: row[column] for column in backfill.key}
        out.append(Change(Operation.INSERT, table, row, None, key, position, None, None, True,
                          None, version))
    if markers and window.complete:
        out.append(SnapshotState(table, "done", positions[-1]))
    return out, positions[-1] if positions else None


class ChunkReader:
    """Reads a back-fill chunk's rows as dicts (one short statement, in its own transaction),
    loaded by the stream's own loaders: the same values as streamed rows."""

    def __init__(self) -> None:
        self._loaders: TypeLoaders | None = None

    def __call__(
        self, conn: psycopg.Connection, query: sql.Composed, size: int
    ) -> list[dict[str, Any]]:
        if self._loaders is None or self._loaders.catalog is not conn:
            conn.execute(SESSION_SETTINGS)  # the settings the loaders expect of values' text
            self._loaders = psycopg_loaders(conn, catalog=conn)
        return query_rows(conn, query, self._loaders)


def save_backfills(
    conn: Callable[[], psycopg.Connection], publication: str, meta: dict[str, Any],
    states: dict[str, Any],
) -> None:
    """Record back-fill progress in the publication's record (a failure is only a warning:
    the back-fill then continues from an earlier chunk after a restart)."""
    meta["backfill"] = dict(states)
    try:
        catalog.write_meta(conn(), publication, meta)
    except (psycopg.Error, BackendError) as exc:
        log.warning("could not record back-fill progress on %s: %s", publication,
                    first_line(exc))


class ChunkedSnapshots:
    """A feed's back-fills beside the stream (see `backfill`): which tables to back-fill, the
    requests that come through the slot, and each chunk's rows at its high watermark.

    ``backfiller`` does the chunk I/O on the plain connection ``connection`` gives, and records
    progress with ``save``; ``tables`` are the feed's."""

    def __init__(
        self, slot: str, tables: WatchedTables, connection: Callable[[], psycopg.Connection],
        *, markers: bool, batch: int, save: Callable[[dict[str, Any]], None],
    ) -> None:
        self.backfiller = Backfiller(
            slot, batch, connection, ChunkReader(),
            lambda oid: tables.by_oid[oid].identifier, save,
        )
        self.tables = tables
        self.connection = connection
        self.markers = markers
        self.batch = batch

    def plan(self, conn: psycopg.Connection, meta: dict[str, Any]) -> None:
        """Back-fill each table whose snapshot was not delivered on this slot yet, continuing
        after the last recorded chunk of one cut short."""
        planned = list(backfill_states(meta, self.tables.by_oid.values()))
        if planned:
            self.backfiller.states.update(meta.get("backfill") or {})
        for table, state in planned:
            name = self.tables.stream_names.get(table.oid, table.qualified)
            self.backfiller.start(table_backfill(conn, table, name, state))

    def on_message(
        self, message: Message, decoder: PgOutputDecoder
    ) -> list[Change | SnapshotState]:
        """Handle one of changefeed's own messages: a watermark closing a chunk (its rows come
        out, positioned in the watermark's transaction), or a back-fill request."""
        if message.prefix == BACKFILL_PREFIX:
            self._requested(message.content)
            return []
        window = self.backfiller.watermark(message.content)
        if window is None:
            return []
        oid = window.backfill.oid
        relation = decoder.relations.get(oid)
        version = (relation.schema_version if relation is not None
                   else schema_version_of(self.connection(), oid))
        changes, last = window_changes(
            window, self.tables.stream_names.get(oid, window.backfill.table), version,
            decoder.next_position, markers=self.markers,
        )
        self.backfiller.handed_out(last)
        return changes

    def _requested(self, content: bytes) -> None:
        for oid in requested_tables(content, self.backfiller.slot):
            table = self.tables.by_oid.get(oid)
            if table is None or oid in self.tables.dropped:
                continue
            if not table.key:
                log.warning("cannot back-fill %s: it has no primary key", table.qualified)
                continue
            log.info("back-fill of %s requested: reading it in chunks of %s rows",
                     table.qualified, f"{self.batch:,}")
            name = self.tables.stream_names.get(oid, table.qualified)
            self.backfiller.start(table_backfill(self.connection(), table, name))
