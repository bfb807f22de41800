"""The shape log: every change of the served tables, in PostgreSQL, numbered, kept and compacted.

`prepare_schema` makes its tables (``state``, ``tables``, ``log``, ``rows``, ``diffs``);
`LogSink` writes each batch a pipeline delivers in one transaction, so the pipeline acknowledges
only what the log holds; `Feeder` makes one ``serve`` process the feeder (an advisory lock);
compaction keeps the log within its windows. ARCHITECTURE.md ("The shape log") says why."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

from changefeed import (
    UNCHANGED,
    Batch,
    Change,
    ChangefeedError,
    ConfigurationError,
    Message,
    Operation,
    Pipeline,
    Sink,
    SnapshotState,
    Truncate,
    get_changefeed,
)
from changefeed.errors import first_line
from changefeed.formats.codec import dumps, dumps_default  # changefeed's JSON encoding
from changefeed.formats.json_values import RawJson, loads_document, loads_text, lone_surrogate
from changefeed.serve.sync.values import COLUMNS_SQL, KEY_SQL, TableInfo, table_from_rows

log = logging.getLogger("changefeed.serve.sync")

DEFAULT_SCHEMA = "changefeed_sync"
BATCH_SECONDS = 0.01
"""The longest a change waits for others to be logged in one transaction with it."""


def jsonify(value: Any) -> Any:
    """``value`` (Python values from a feed) as changefeed JSON: what the log keeps. Read back
    exactly (`loads_document`): json numbers keep their digits, values nested too deep for
    Python stay their JSON text (`RawJson`), so no value can stop the log."""
    return loads_document(dumps(value))


def key_text(key: Any) -> str:
    """A key (JSON) in one canonical text, to find it in dicts."""
    return orjson.dumps(key, default=dumps_default, option=orjson.OPT_SORT_KEYS).decode()


def schema_ddl(schema: str) -> list[sql.Composable]:
    """The statements that create the log's schema (idempotent)."""
    s = sql.Identifier(schema)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s),
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.state (id int PRIMARY KEY CHECK (id = 1),"
                " epoch text NOT NULL, head bigint NOT NULL DEFAULT 0, position text,"
                " log_horizon bigint NOT NULL DEFAULT 0,"
                " tombstone_horizon bigint NOT NULL DEFAULT 0,"
                " created_at timestamptz NOT NULL DEFAULT now())").format(s),
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.tables (name text PRIMARY KEY,"
                " loaded boolean NOT NULL DEFAULT false)").format(s),
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.log (seq bigint PRIMARY KEY, tbl text NOT NULL,"
                " key jsonb NOT NULL, op \"char\" NOT NULL, new jsonb, old jsonb, xid bigint,"
                " committed_at timestamptz, logged_at timestamptz NOT NULL DEFAULT now())"
                ).format(s),
        sql.SQL("CREATE INDEX IF NOT EXISTS log_tbl_seq ON {}.log (tbl, seq)").format(s),
        sql.SQL("CREATE INDEX IF NOT EXISTS log_logged_at ON {}.log (logged_at)").format(s),
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.rows (tbl text NOT NULL, key jsonb NOT NULL,"
                " seq bigint NOT NULL, row jsonb,"
                " changed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tbl, key))"
                ).format(s),
        sql.SQL("CREATE INDEX IF NOT EXISTS rows_tbl_seq ON {}.rows (tbl, seq)").format(s),
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.diffs (owner text NOT NULL, id text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (owner, id))"
                ).format(s),
    ]


def fence_prefix(schema: str) -> str:
    """The prefix of the logical messages that mark a transaction as wholly logged: a Mobync
    request writes one last in its transaction; the sink logs it as an entry of op ``f``
    (no table) after every change before it, so a reader that has it has them all."""
    return f"changefeed_sync.fence:{schema}"


def lock_key(schema: str) -> str:
    """The advisory lock's name (hashed by ``hashtext`` in SQL): one feeder per schema."""
    return f"changefeed_sync:{schema}"


def slot_name(schema: str) -> str:
    """The replication slot (and publication) feeding the log of ``schema``."""
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in schema.lower())
    return name[:63]


def resolve_tables(conn: psycopg.Connection, names: Sequence[str]) -> list[TableInfo]:
    """The served tables, read from the catalog: each must exist and have a primary key."""
    tables: list[TableInfo] = []
    for name in names:
        row = conn.execute(
            "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            [name]).fetchone()
        if row is None or row[3] not in ("r", "p"):
            raise ConfigurationError(f"table {name!r} does not exist")
        oid, schema, relname, _ = row
        columns = conn.execute(COLUMNS_SQL, [oid]).fetchall()
        key = [r[0] for r in conn.execute(KEY_SQL, [oid]).fetchall()]
        if not key:
            raise ConfigurationError(
                f"table {schema}.{relname} has no primary key: app clients find rows by key,"
                " add one (ALTER TABLE ... ADD PRIMARY KEY)")
        table = table_from_rows(schema, relname, columns, key)
        if any(t.qualified == table.qualified for t in tables):
            raise ConfigurationError(f"table {table.qualified} is given twice")
        tables.append(table)
    return tables


def prepare_schema(conn: psycopg.Connection, schema: str, tables: Iterable[TableInfo]) -> str:
    """Create the log's schema if needed and note the served tables; return the log's epoch.

    Runs under a transaction-level advisory lock, so several processes starting at once do it
    once. A new log (no state row) drops a replication slot left from an earlier log of the same
    name: its snapshot went into the log that is gone, and the new log needs its own."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [lock_key(schema) + ":ddl"])
        for statement in schema_ddl(schema):
            conn.execute(statement)
        s = sql.Identifier(schema)
        row = conn.execute(sql.SQL("SELECT epoch FROM {}.state").format(s)).fetchone()
        if row is None:
            epoch = f"{int(time.time())}{secrets.randbelow(1000):03d}"
            # Offsets start at the creation time in microseconds, above every offset an earlier
            # log of this name gave out (it would have needed more than a change per
            # microsecond): a device's clock from a dropped log is then below the horizons
            # and is told to sync again from 0, never served from the wrong log.
            base = time.time_ns() // 1000
            conn.execute(sql.SQL("INSERT INTO {}.state (id, epoch, head, log_horizon,"
                                 " tombstone_horizon) VALUES (1, %s, %s, %s, %s)").format(s),
                         [epoch, base, base, base])
            name = slot_name(schema)
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                         " WHERE slot_name = %s AND NOT active", [name])
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
        else:
            epoch = row[0]
        for table in tables:
            conn.execute(sql.SQL("INSERT INTO {}.tables (name) VALUES (%s)"
                                 " ON CONFLICT DO NOTHING").format(s), [table.qualified])
    return epoch


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
                            copy.write_row((e.seq, e.tbl, _text(e.key), e.op, _text(e.new),
                                            _text(e.old), e.xid, e.committed_at))
                if rows:
                    conn.execute(sql.SQL(
                        "INSERT INTO {}.rows (tbl, key, seq, row)"
                        " SELECT * FROM unnest(%s::text[], %s::jsonb[], %s::bigint[], %s::jsonb[])"
                        " ON CONFLICT (tbl, key) DO UPDATE SET seq = EXCLUDED.seq,"
                        " row = EXCLUDED.row, changed_at = now()").format(s),
                        [[r[0] for r in rows], [_text(r[1]) for r in rows],
                         [r[2] for r in rows], [_text(r[3]) for r in rows]])
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
            [[t for t, _ in wanted], [_text(k) for k in wanted.values()]])
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


RAW_TEXT = "changefeed.json_text"
"""The key of ``{RAW_TEXT: text}``, how the log holds a column value jsonb cannot: a json value
escaping a lone surrogate (``"\\ud800"``); `load_log_json` gives back its text (`RawJson`)."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = dumps(value)
    if isinstance(value, dict) and lone_surrogate(text):  # rare: checked on bytes first
        text = dumps({column: {RAW_TEXT: dumps(item).decode()}
                      if lone_surrogate(dumps(item)) else item
                      for column, item in value.items()})
    return text.decode()


def load_log_json(data: bytes) -> Any:
    """A jsonb value of the log (a row, a key), read exactly at any depth (`loads_text`), the
    column values `_text` had to mark as their text again (`RawJson`)."""
    value = loads_text(data)
    if isinstance(value, dict) and RAW_TEXT.encode() in data:
        for column, item in value.items():
            if isinstance(item, dict) and len(item) == 1 and isinstance(item.get(RAW_TEXT), str):
                value[column] = RawJson(item[RAW_TEXT])
    return value


def compact(conn: psycopg.Connection, schema: str, log_window: float,
            tombstone_window: float) -> tuple[int, int]:
    """Drop log entries older than ``log_window`` seconds and tombstones (and remembered diff
    ids) older than ``tombstone_window``; return the new log and tombstone horizons."""
    s = sql.Identifier(schema)
    with conn.transaction():
        row = conn.execute(sql.SQL("SELECT log_horizon, tombstone_horizon FROM {}.state"
                                   " WHERE id = 1 FOR UPDATE").format(s)).fetchone()
        assert row is not None
        log_horizon, tombstone_horizon = row
        gone = conn.execute(sql.SQL(
            "WITH gone AS (DELETE FROM {}.log WHERE logged_at < now() - make_interval(secs => %s)"
            " RETURNING seq) SELECT max(seq) FROM gone").format(s), [log_window]).fetchone()
        if gone and gone[0] is not None:
            log_horizon = max(log_horizon, gone[0])
        gone = conn.execute(sql.SQL(
            "WITH gone AS (DELETE FROM {}.rows WHERE row IS NULL"
            " AND changed_at < now() - make_interval(secs => %s) RETURNING seq)"
            " SELECT max(seq) FROM gone").format(s), [tombstone_window]).fetchone()
        if gone and gone[0] is not None:
            tombstone_horizon = max(tombstone_horizon, gone[0])
        conn.execute(sql.SQL("DELETE FROM {}.diffs WHERE applied_at < now()"
                             " - make_interval(secs => %s)").format(s), [tombstone_window])
        conn.execute(sql.SQL("UPDATE {}.state SET log_horizon = %s, tombstone_horizon = %s")
                     .format(s), [log_horizon, tombstone_horizon])
        conn.execute("SELECT pg_notify(%s, 'compacted')", [schema])
    return log_horizon, tombstone_horizon


class Feeder(threading.Thread):
    """Feeds the log while this process holds the schema's advisory lock (see the module's
    notes), and compacts it every ``compact_interval`` seconds meanwhile.

    ``state`` is ``starting``, ``standby`` (another process feeds), ``streaming``, ``failed``
    (``error`` says why; it tries again after ``retry_seconds``) or ``stopped``.
    """

    def __init__(self, url: str, schema: str, tables: Sequence[TableInfo], *,
                 log_window: float, tombstone_window: float, compact_interval: float,
                 retry_seconds: float = 2.0) -> None:
        super().__init__(name="changefeed-sync-feeder", daemon=True)
        self.url = url
        self.schema = schema
        self.tables = list(tables)
        self.log_window = log_window
        self.tombstone_window = tombstone_window
        self.compact_interval = compact_interval
        self.retry_seconds = retry_seconds
        self.state = "starting"
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        self._stopping = threading.Event()
        self._pipeline: Pipeline | None = None
        self.sink: LogSink | None = None

    def _set(self, state: str, error: BaseException | None = None) -> None:
        with self.changed:
            self.state = state
            self.error = error
            self.changed.notify_all()

    def wait_settled(self, timeout: float) -> str:
        """Wait until the feeder streams, stands by or failed (at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.state == "starting" and time.monotonic() < deadline:
                self.changed.wait(max(0.0, deadline - time.monotonic()))
            return self.state

    def stop(self) -> None:
        """Stop feeding: the pipeline delivers and acknowledges what it has, then ends."""
        self._stopping.set()
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.stop()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as lock_conn:
                    held = lock_conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                             [lock_key(self.schema)]).fetchone()
                    if not (held and held[0]):
                        if self.state != "standby":
                            log.info("another serve process feeds the shape log: standing by")
                        self._set("standby")
                        self._stopping.wait(self.retry_seconds)
                        continue
                    self._feed(lock_conn)
            except Exception as exc:  # the loop goes on: another attempt after a pause
                if self._stopping.is_set():
                    break
                log.error("shape log feed failed: %s; trying again in %.0f s", first_line(exc),
                          self.retry_seconds * 5)
                log.debug("shape log feed failure", exc_info=True)
                self._set("failed", exc)
                self._stopping.wait(self.retry_seconds * 5)
        self._set("stopped", self.error)

    def _feed(self, lock_conn: psycopg.Connection) -> None:
        name = slot_name(self.schema)
        feed = get_changefeed(self.url, [t.qualified for t in self.tables], prefeed="snapshot",
                              slot=name, publication=name, snapshot_markers=True,
                              status_interval=1.0, messages=[fence_prefix(self.schema)])
        self.sink = LogSink(self.url, self.schema, self.tables)
        # Batches close after at most BATCH_SECONDS: a change waits no longer to be logged.
        pipeline = Pipeline(feed, sink=self.sink, batch_size=1000, batch_seconds=BATCH_SECONDS)
        self._pipeline = pipeline
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                pipeline.run()
            except BaseException as exc:  # reported by the feeder's loop
                outcome.append(exc)

        runner = threading.Thread(target=run, name="changefeed-sync-pipeline", daemon=True)
        runner.start()
        next_compaction = time.monotonic() + min(self.compact_interval, 5.0)
        try:
            while runner.is_alive():
                if self.state != "streaming" and feed.connected_once:
                    log.info("feeding the shape log (%s) from slot %s", self.schema, name)
                    self._set("streaming")
                runner.join(0.2)
                if self._stopping.is_set():
                    pipeline.stop()
                    continue
                if time.monotonic() >= next_compaction and self.state == "streaming":
                    compact(lock_conn, self.schema, self.log_window, self.tombstone_window)
                    next_compaction = time.monotonic() + self.compact_interval
        finally:
            pipeline.stop()
            runner.join()
            self._pipeline = None
        if outcome:
            raise outcome[0]
        if not self._stopping.is_set():
            raise ChangefeedError("the shape log's feed ended")


__all__ = ["DEFAULT_SCHEMA", "Feeder", "LogSink", "compact", "fence_prefix", "jsonify",
           "key_text",
           "prepare_schema", "resolve_tables", "slot_name"]
