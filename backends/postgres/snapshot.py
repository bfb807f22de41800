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
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.connection import connect
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.loading import TypeLoaders, load_result, psycopg_loaders
from changefeed.backends.postgres.pgoutput import schema_version
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.tables import Table, stream_columns
from changefeed.change import Change, Operation, SnapshotState
from changefeed.errors import BackendError

log = logging.getLogger("changefeed.postgres")

PENDING = "pending"
DONE = "done"
"""The snapshot states recorded on the publication (``meta["snapshot"]``)."""

_TYPE = struct.Struct("!Ii")

SnapshotItem = tuple[Table, str | None, dict[str, Any] | str]
"""(table, its schema version, a row or "started" / "done")."""

FETCH_BYTES = 8 << 20
"""A snapshot read fetches about this much per round trip (and at most its batch of rows)."""
_CURSOR = sql.Identifier("changefeed_rows")


def row_bytes(rows: Sequence[dict[str, Any]]) -> int:
    """About the memory ``rows`` hold: the length of their text and bytes values, the shallow
    size of json and array values, 16 bytes for any other. Measured per column, so that a
    column of numbers costs nothing to measure."""
    if not rows:
        return 0
    total = 0
    for name in rows[0]:
        get = itemgetter(name)
        sample = next((value for value in map(get, rows) if value is not None), None)
        kind = sample.__class__
        if kind is str or kind is bytes or issubclass(kind, (str, bytes)):
            total += sum(len(value) for value in map(get, rows) if value is not None)
        elif kind is dict or kind is list:
            total += sum(map(sys.getsizeof, map(get, rows)))
        else:
            total += 16 * len(rows)
    return total


class BoundedFetch:
    """Reads a query's rows through a cursor, fetching as many at a time as fit in a number
    of bytes: a table of 5 MB rows is read a few rows at a time, one of small rows thousands
    at a time. The size of a row is learnt as it goes (`row_bytes`); the first fetch takes
    one row unless ``row_size`` says how big they were before. ``conn`` must be in a
    transaction."""

    def __init__(
        self, conn: psycopg.Connection, query: sql.Composable, loaders: TypeLoaders,
        row_size: float = 0.0,
    ) -> None:
        self.cursor = conn.cursor()
        self.cursor.execute(sql.SQL("DECLARE {} NO SCROLL CURSOR FOR {}").format(_CURSOR, query))
        self.loaders = loaders
        self.row_size = row_size
        self.ended = False
        """The query has no more rows."""

    def fetch(self, rows: int, nbytes: int) -> list[dict[str, Any]]:
        """At most ``rows`` rows, about ``nbytes`` at most (at least one row)."""
        count = max(1, min(rows, int(nbytes / self.row_size) if self.row_size else 1))
        self.cursor.execute(sql.SQL("FETCH FORWARD {} FROM {}").format(
            sql.Literal(count), _CURSOR))
        result = self.cursor.pgresult
        got = load_result(result, self.loaders) if result is not None and result.ntuples else []
        if len(got) < count:
            self.ended = True
        if got:
            self.row_size = max(1.0, row_bytes(got) / len(got))
        return got

    def close(self) -> None:
        self.cursor.close()


def exported_rows(
    reader: psycopg.Connection, snapshot_name: str, tables: Iterable[Table],
    batch: int, *, markers: bool = False,
) -> Iterator[SnapshotItem]:
    """Each table's rows in the exported snapshot ``snapshot_name``, loaded by the stream's own
    loaders (the same values as streamed rows, the same columns), with ``"started"`` and
    ``"done"`` around each table's rows when ``markers`` is set. At most ``batch`` rows and
    about `FETCH_BYTES` are held at a time. ``reader``: a fresh autocommit connection."""
    loaders = psycopg_loaders(reader, catalog=reader)
    reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
    for table in tables:
        relation = table.identifier
        version = schema_version_of(reader, table.oid)
        columns = stream_columns(reader, table.oid)
        total = _estimate(reader, table)
        log.info("snapshot of %s: reading ~%s rows", table.qualified, f"{total:,}")
        if markers:
            yield table, version, "started"
        started = last_report = time.monotonic()
        done = 0
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), relation)
        fetch = BoundedFetch(reader, query, loaders)
        while not fetch.ended:
            for row in fetch.fetch(batch, FETCH_BYTES):
                done += 1
                yield table, version, row
            now = time.monotonic()
            if now - last_report >= 2.0:
                last_report = now
                log.info("snapshot of %s: %s / ~%s rows (%.0f rows/s)", table.qualified,
                         f"{done:,}", f"{max(total, done):,}", done / (now - started))
        fetch.close()
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
    key = {column: row[column] for column in table.key} if table.key else dict(row)
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
        with connect(dsn) as conn:
            catalog.write_meta(conn, publication, meta)
    except (psycopg.Error, BackendError) as exc:
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


