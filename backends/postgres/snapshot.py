"""The exported snapshot: the tables' rows as of the slot's creation, in one transaction.

When a feed's snapshot cannot go in chunks beside the stream (`backfill.in_chunks`: servers
before PostgreSQL 14, tables without a primary key), the slot is created with
``EXPORT_SNAPSHOT`` and the tables are read in that snapshot (`exported_rows`); the stream then
continues exactly where the read ended, with no gap and no duplicate. The publication's record
(see `catalog`) says whether the snapshot was delivered (`mark`), so a feed cut short takes it
again: the slot alone cannot tell.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.loading import psycopg_loaders, read_rows
from changefeed.backends.postgres.pgoutput import schema_version
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.tables import Table
from changefeed.backends.postgres.values import SESSION_SETTINGS
from changefeed.change import Change, Operation, SnapshotState

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


