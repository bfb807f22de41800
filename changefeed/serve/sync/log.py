"""The shape log: every change of the served tables, in PostgreSQL, numbered, kept and compacted.

`prepare_schema` makes its tables (``state``, ``tables``, ``log``, ``rows``, ``diffs``);
`log_sink.LogSink` writes each batch a pipeline delivers in one transaction, so the pipeline
acknowledges only what the log holds; `feeder.Feeder` makes one ``serve`` process the feeder (an
advisory lock); `compact` keeps the log within its windows. Rows and keys are kept as
changefeed JSON (`jsonify`, `log_text`, `load_log_json`). ARCHITECTURE.md ("The shape log")
says why."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import psycopg
from psycopg import sql

from changefeed import ConfigurationError
from changefeed.formats.codec import dumps, dumps_default  # changefeed's JSON encoding
from changefeed.formats.json_values import RawJson, loads_document, loads_text, lone_surrogate
from changefeed.serve.sync.values import COLUMNS_SQL, KEY_SQL, TableInfo, table_from_rows

DEFAULT_SCHEMA = "changefeed_sync"


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


RAW_TEXT = "changefeed.json_text"
"""The key of ``{RAW_TEXT: text}``, how the log holds a column value jsonb cannot: a json value
escaping a lone surrogate (``"\\ud800"``); `load_log_json` gives back its text (`RawJson`)."""


def log_text(value: Any) -> str | None:
    """``value`` as the jsonb text the log keeps (None stays SQL NULL)."""
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
    column values `log_text` had to mark as their text again (`RawJson`)."""
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


__all__ = ["DEFAULT_SCHEMA", "compact", "fence_prefix", "jsonify", "key_text", "load_log_json",
           "lock_key", "log_text", "prepare_schema", "resolve_tables", "schema_ddl", "slot_name"]
