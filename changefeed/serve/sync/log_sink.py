"""`LogSink`: the sink that writes the changes a pipeline delivers into the shape log
(`changefeed.serve.sync.log`), one transaction per batch, whole old rows filled in from the log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

from changefeed import (
    UNCHANGED,
    Batch,
    Change,
    Message,
    Operation,
    Sink,
    SnapshotState,
    Truncate,
)
from changefeed.serve.sync.log import jsonify, key_text, load_log_json, log_text
from changefeed.serve.sync.values import TableInfo


@dataclass
class _Pending:
    """One log entry being made from a change."""

    seq: int
    tbl: str
    key: Any
    op: str
    new: Any
    old: Any
    xid: Any
    committed_at: Any


class LogSink(Sink):
    """Writes batches of changes into the shape log, one transaction per batch (see the module's
    notes). Returning is the confirmation the pipeline acknowledges."""

    name = "shape log"
    accepts = "changes"

    def __init__(self, url: str, schema: str, tables: Sequence[TableInfo]) -> None:
        self.url = url
        self.schema = schema
        self.keys = {table.qualified: table.key for table in tables}
        self._conn: psycopg.Connection | None = None
        self.on_write: Any = None
        """Called with the new head after each committed batch (tests, metrics)."""

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=False)
            set_json_loads(load_log_json, self._conn)  # old rows: any depth, exact
        return self._conn

    def write_batch(self, batch: Batch) -> None:
        conn = self.connection()
        s = sql.Identifier(self.schema)
        try:
            with conn.transaction():
                head, position = conn.execute(
                    sql.SQL("SELECT head, position FROM {}.state WHERE id = 1 FOR UPDATE")
                    .format(s)).fetchone()  # type: ignore[misc]
                fresh = [(item, pos) for item, pos in zip(batch.items, batch.positions,
                                                          strict=True)
                         if position is None or pos is None or str(pos) > position]
                if not fresh:
                    return
                changes = [item for item, _ in fresh
                           if isinstance(item, (Change, Message, Truncate))]
                known = self._known_rows(conn, [c for c in changes if isinstance(c, Change)])
                emptied = self._table_rows(conn, {c.table for c in changes
                                                  if isinstance(c, Truncate)})
                entries, rows, head = self._entries(changes, known, head, emptied)
                if entries:
                    with conn.cursor().copy(sql.SQL(
                            "COPY {}.log (seq, tbl, key, op, new, old, xid, committed_at)"
                            " FROM STDIN").format(s)) as copy:
                        for e in entries:
                            copy.write_row((e.seq, e.tbl, log_text(e.key), e.op, log_text(e.new),
                                            log_text(e.old), e.xid, e.committed_at))
                if rows:
                    conn.execute(sql.SQL(
                        "INSERT INTO {}.rows (tbl, key, seq, row)"
                        " SELECT * FROM unnest(%s::text[], %s::jsonb[], %s::bigint[], %s::jsonb[])"
                        " ON CONFLICT (tbl, key) DO UPDATE SET seq = EXCLUDED.seq,"
                        " row = EXCLUDED.row, changed_at = now()").format(s),
                        [[r[0] for r in rows], [log_text(r[1]) for r in rows],
                         [r[2] for r in rows], [log_text(r[3]) for r in rows]])
                for item, _ in fresh:
                    if isinstance(item, SnapshotState) and item.state == "done":
                        conn.execute(sql.SQL("UPDATE {}.tables SET loaded = true WHERE name = %s")
                                     .format(s), [item.table])
                last = next((str(p) for _, p in reversed(fresh) if p is not None), position)
                conn.execute(sql.SQL("UPDATE {}.state SET head = %s, position = %s WHERE id = 1")
                             .format(s), [head, last])
                conn.execute("SELECT pg_notify(%s, %s)", [self.schema, str(head)])
        except psycopg.OperationalError:
            self.close()
            raise
        if self.on_write is not None:
            self.on_write(head)

    def _known_rows(self, conn: psycopg.Connection, changes: list[Change]) -> dict[tuple, Any]:
        """The rows logged last for the keys of ``changes`` (None for a tombstone)."""
        wanted: dict[tuple[str, str], Any] = {}
        for change in changes:
            for key in self._keys_of(change):
                wanted[(change.table, key_text(key))] = key
        if not wanted:
            return {}
        cursor = conn.execute(
            sql.SQL("SELECT r.tbl, r.key, r.row FROM {}.rows r"
                    " JOIN unnest(%s::text[], %s::jsonb[]) AS w(tbl, key)"
                    " ON r.tbl = w.tbl AND r.key = w.key").format(sql.Identifier(self.schema)),
            [[t for t, _ in wanted], [log_text(k) for k in wanted.values()]])
        return {(tbl, key_text(key)): row for tbl, key, row in cursor}

    def _table_rows(self, conn: psycopg.Connection,
                    tables: set[str]) -> dict[tuple[str, str], tuple[Any, Any]]:
        """Every row logged (not a tombstone) of ``tables``: (table, key text) -> (key, row)."""
        if not tables:
            return {}
        cursor = conn.execute(
            sql.SQL("SELECT tbl, key, row FROM {}.rows WHERE tbl = ANY(%s) AND row IS NOT NULL")
            .format(sql.Identifier(self.schema)), [sorted(tables)])
        return {(tbl, key_text(key)): (key, row) for tbl, key, row in cursor}

    def _keys_of(self, change: Change) -> list[Any]:
        keys = []
        if change.key is not None:
            keys.append(jsonify(change.key))
        old_key = self._old_key(change)
        if old_key is not None and old_key not in keys:
            keys.append(old_key)
        return keys

    def _old_key(self, change: Change) -> Any:
        columns = self.keys.get(change.table, ())
        if change.old and all(column in change.old for column in columns):
            return jsonify({column: change.old[column] for column in columns})
        return None

    def _entries(self, changes: Sequence[Change | Message | Truncate], known: dict[tuple, Any],
                 head: int, emptied: dict[tuple[str, str], tuple[Any, Any]] | None = None,
                 ) -> tuple[list[_Pending], list[tuple], int]:
        """The log entries of ``changes`` and the rows they leave. A `Truncate` is a delete of
        every row of its table: those logged before (``emptied``, from `_table_rows`) and
        those of this batch."""
        entries: list[_Pending] = []
        rows: dict[tuple[str, str], tuple] = {}
        keys = dict(emptied or {})  # (table, key text) -> (key, row) of the truncated tables
        truncates = any(isinstance(change, Truncate) for change in changes)

        def emit(tbl: str, key: Any, op: str, new: Any, old: Any,
                 change: Change | Truncate) -> None:
            nonlocal head
            head += 1
            entries.append(_Pending(head, tbl, key, op, new, old, change.transaction,
                                    change.committed_at))
            ktext = key_text(key)
            known[(tbl, ktext)] = new
            rows[(tbl, ktext)] = (tbl, key, head, new)
            if truncates:
                keys[(tbl, ktext)] = (key, new)

        for change in changes:
            if isinstance(change, Message):  # a fence: the transaction is wholly logged
                head += 1
                entries.append(_Pending(head, "", {}, "f", None, None, change.transaction,
                                        change.committed_at))
                continue
            tbl = change.table
            if isinstance(change, Truncate):
                for (table, ktext), (key, row) in list(keys.items()):
                    current = known.get((table, ktext), row)
                    if table == tbl and current is not None:
                        emit(tbl, key, "d", None, current, change)
                continue
            if change.key is None:
                continue
            key = jsonify(change.key)
            previous = known.get((tbl, key_text(key)))
            operation = change.operation
            if operation is Operation.DELETE:
                old_key = self._old_key(change) or key
                previous = known.get((tbl, key_text(old_key)))
                if previous is None:  # never logged (its snapshot chunk not read yet): a tombstone
                    head += 1
                    rows[(tbl, key_text(old_key))] = (tbl, old_key, head, None)
                    known[(tbl, key_text(old_key))] = None
                    continue
                emit(tbl, old_key, "d", None, previous, change)
                continue
            old_key = self._old_key(change) if operation is Operation.UPDATE else None
            if old_key is not None and old_key != key:  # the primary key itself changed
                moved = known.get((tbl, key_text(old_key)))
                if moved is not None:
                    emit(tbl, old_key, "d", None, moved, change)
                previous = known.get((tbl, key_text(key)))
            new = jsonify(_fill_unchanged(change.new or {}, previous))
            if previous is None:
                emit(tbl, key, "i", new, None, change)
            elif change.snapshot and new == previous:
                continue  # a snapshot row the stream already gave: nothing changes
            else:
                emit(tbl, key, "u", new, previous, change)
        return entries, list(rows.values()), head

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def _fill_unchanged(new: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    if UNCHANGED not in new.values():
        return new
    previous = previous or {}
    return {column: previous.get(column) if value is UNCHANGED else value
            for column, value in new.items()}


__all__ = ["LogSink"]
