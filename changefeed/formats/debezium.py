"""Debezium-compatible change events: what Debezium's PostgreSQL and MongoDB connectors emit.

Consumers written for Debezium (Kafka Connect sinks, Flink CDC, ksqlDB, hand-written consumers)
read these unchanged, as they read Debezium's events through ``JsonConverter`` with
``schemas.enable=false``: the record value is the envelope ::

    {"before": ..., "after": ..., "op": "c" | "u" | "d" | "r", "ts_ms": ...,
     "source": {"version", "connector", "name", "ts_ms", "snapshot", "db", ...},
     "transaction": ...}

and the record key is the JSON of the key columns (``{"id": 7}``; MongoDB: ``{"id": "<the
_id as Extended JSON>"}``). For PostgreSQL ``before``/``after`` are rows; for MongoDB they are
Extended JSON strings, with ``updateDescription`` on updates, as Debezium's MongoDB connector
writes them. ``op`` is ``c`` (insert), ``u`` (update), ``d`` (delete), ``r`` (a snapshot read),
``t`` (a `Truncate`: the table was emptied; ``before`` and ``after`` are null and the record key
is null, as Debezium's truncate events have them). The top-level ``ts_ms`` is when the event was
made, ``source.ts_ms`` the commit time.

Everything here is a pure function of a `Change` and a `Source`; the README lists the fields
that cannot match Debezium's and why.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import changefeed._speedups as _speedups
from changefeed.change import UNCHANGED, Change, Operation, Truncate
from changefeed.errors import DecodeError
from changefeed.formats.codec import dumps_line

UNAVAILABLE = "__debezium_unavailable_value"
"""Debezium's placeholder for an unchanged TOASTed column it was not sent (our `UNCHANGED`)."""

_OPS = {Operation.INSERT: "c", Operation.UPDATE: "u", Operation.DELETE: "d"}


@dataclass(frozen=True)
class Source:
    """What the envelope's ``source`` says about where changes come from.

    ``connector``: ``"postgresql"``, ``"mongodb"``, or None to tell by each change's position.
    ``name``: Debezium's ``topic.prefix`` (the logical server name). ``database``: PostgreSQL's
    database name (MongoDB's comes with each change's table, ``db.collection``).
    """

    connector: str | None = None
    name: str = "changefeed"
    database: str | None = None


def connector_of(change: Change | Truncate) -> str:
    """``"postgresql"`` or ``"mongodb"``, told by the shape of the change's position."""
    position = change.position
    if isinstance(position, str) and ":" in position:
        return "postgresql"
    if isinstance(position, dict):
        return "mongodb"
    return "changefeed"  # a position this module does not know (RethinkDB has none)


def envelope(
    change: Change | Truncate, source: Source = Source(), *, now_ms: int | None = None,
    data_collection_order: int | None = None,
) -> dict[str, Any]:
    """The Debezium event value of ``change`` (``now_ms``: the event's ``ts_ms``, default now).

    ``data_collection_order``: the change's rank among its transaction's changes of the same
    table, counted by the caller (`DebeziumEncoder` does); default: its rank in the transaction.
    """
    if isinstance(change, Truncate):
        return _truncate_envelope(change, source, now_ms, data_collection_order)
    connector = source.connector or connector_of(change)
    op = "r" if change.snapshot else _OPS[change.operation]
    committed_ms = _ms(change.committed_at)
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    info: dict[str, Any] = {
        "version": _version(),
        "connector": connector,
        "name": source.name,
        "ts_ms": committed_ms,
        "snapshot": _snapshot(change),
    }
    if connector == "mongodb":
        event = _mongodb(change, info)
    else:
        event = _relational(change, info, source.database, data_collection_order)
    event["op"] = op
    event["ts_ms"] = now_ms
    return event


def _relational(
    change: Change, info: dict[str, Any], database: str | None, collection_order: int | None
) -> dict[str, Any]:
    before = change.old
    if change.operation is Operation.UPDATE and before is not None and _only_key(change):
        before = None  # Debezium under REPLICA IDENTITY DEFAULT: no before for updates
    return {
        "before": _row(before),
        "after": _row(change.new),
        "source": info,
        "transaction": _source_and_transaction(change, info, database, collection_order),
    }


def _source_and_transaction(
    change: Change | Truncate, info: dict[str, Any], database: str | None,
    collection_order: int | None,
) -> dict[str, Any] | None:
    """Complete a relational ``source`` (in place); the ``transaction`` block."""
    schema, _, table = change.table.rpartition(".")
    lsn, index = _lsn_and_index(change.position)
    info.update({
        "db": database,
        "sequence": json.dumps([None, str(lsn)], separators=(",", ":")) if lsn else None,
        "schema": schema or "public",
        "table": table,
        "txId": change.transaction,
        "lsn": lsn,
        "xmin": None,
    })
    if change.transaction is None or lsn is None or getattr(change, "snapshot", False):
        return None
    order = index + 1
    return {
        "id": f"{change.transaction}:{lsn}",
        "total_order": order,
        "data_collection_order": collection_order or order,
    }


def _truncate_envelope(
    truncate: Truncate, source: Source, now_ms: int | None, collection_order: int | None
) -> dict[str, Any]:
    """Debezium's truncate event: ``op`` ``t``, no rows, the table in ``source``."""
    info: dict[str, Any] = {
        "version": _version(),
        "connector": source.connector or connector_of(truncate),
        "name": source.name,
        "ts_ms": _ms(truncate.committed_at),
        "snapshot": "false",
    }
    transaction = _source_and_transaction(truncate, info, source.database, collection_order)
    return {
        "before": None,
        "after": None,
        "source": info,
        "transaction": transaction,
        "op": "t",
        "ts_ms": time.time_ns() // 1_000_000 if now_ms is None else now_ms,
    }


def _mongodb(change: Change, info: dict[str, Any]) -> dict[str, Any]:
    database, _, collection = change.table.partition(".")
    info.update({
        "db": database,
        "sequence": None,
        "rs": None,
        "collection": collection,
        "ord": None,
        "lsid": None,
        "txnNumber": None,
    })
    if change.transaction is not None:
        session, _, number = str(change.transaction).rpartition(":")
        info["lsid"], info["txnNumber"] = session, int(number) if number.isdigit() else None
    before = change.old
    if before is not None and change.key is not None and set(before) <= set(change.key):
        before = None  # only documentKey: Debezium has no before without pre-images
    event: dict[str, Any] = {
        "before": extended_json(before) if before is not None else None,
        "after": extended_json(change.new) if change.new is not None else None,
    }
    description = (change.meta or {}).get("update_description")
    if change.operation is Operation.UPDATE and description is not None:
        event["updateDescription"] = {
            "removedFields": description.get("removed_fields") or None,
            "updatedFields": extended_json(description.get("updated_fields") or {}),
            "truncatedArrays": description.get("truncated_arrays") or None,
        }
    event["source"] = info
    event["transaction"] = None
    return event


def key(change: Change | Truncate, source: Source = Source()) -> dict[str, Any] | None:
    """The Debezium record key: the key columns; MongoDB: ``{"id": <_id as Extended JSON>}``;
    none for a truncate."""
    if isinstance(change, Truncate) or change.key is None:
        return None
    if (source.connector or connector_of(change)) == "mongodb":
        return {"id": extended_json(change.key.get("_id"))}
    return change.key


def extended_json(value: Any) -> str:
    """``value`` as MongoDB Extended JSON (relaxed), the strings Debezium's MongoDB events hold."""
    from bson import json_util

    return json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)


def _row(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None or UNCHANGED not in row.values():
        return row
    return {name: UNAVAILABLE if value is UNCHANGED else value for name, value in row.items()}


def _only_key(change: Change) -> bool:
    """Whether ``old`` is the key alone (REPLICA IDENTITY DEFAULT): key columns, fewer than the
    new row has (a table without key has the whole row as key, and its old row is whole)."""
    old, key = change.old, change.key
    return (key is not None and old is not None and set(old) <= set(key)
            and len(old) < len(change.new or ()))


def _lsn_and_index(position: Any) -> tuple[int | None, int]:
    if not isinstance(position, str):
        return None, 0
    lsn, _, index = position.partition(":")
    try:
        value = int(lsn, 16)
        return (value or None), int(index or "0", 16)
    except ValueError:
        return None, 0


def _snapshot(change: Change) -> str:
    if not change.snapshot:
        return "false"
    position = change.position
    if isinstance(position, dict) and position.get("done"):
        return "last"
    return "true"


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


@functools.cache  # reading the package's metadata takes milliseconds: once per process
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"changefeed-{version('changefeed')}"
    except PackageNotFoundError:
        return "changefeed"


class DebeziumEncoder:
    """Makes envelopes one after another, counting ``transaction.data_collection_order``.

    Call it with a `Change` for the envelope; `line` gives the JSON line. It keeps only the
    counters of the transaction in progress.
    """

    def __init__(self, source: Source = Source()) -> None:
        self.source = source
        self._transaction: Any = None
        self._per_table: dict[str, int] = {}

    def __call__(self, change: Change | Truncate) -> dict[str, Any]:
        order = None
        if change.transaction is not None and not getattr(change, "snapshot", False):
            if change.transaction != self._transaction:
                self._transaction = change.transaction
                self._per_table = {}
            order = self._per_table[change.table] = self._per_table.get(change.table, 0) + 1
        return envelope(change, self.source, data_collection_order=order)

    def line(self, change: Change | Truncate) -> bytes:
        """The envelope as one JSON line."""
        return dumps_line(self(change))


def line_encoder(source: Source = Source()) -> Callable[[Change], bytes]:
    """A function giving the Debezium JSON line of each change: `DebeziumEncoder.line`, or
    the compiled encoder of the same bytes where it is built."""
    return DebeziumEncoder(source).line


def change_from_debezium(event: dict[str, Any], key: Any = None) -> Change | Truncate:
    """A `Change` (a `Truncate` for ``op`` ``t``) from a Debezium envelope (ours or Debezium's
    own) and its record key.

    The values are what the JSON holds (Decimals and times as strings); ``position`` is
    rebuilt for PostgreSQL from ``source.lsn`` and ``transaction.total_order`` (None otherwise),
    and the placeholder of an unavailable column becomes `UNCHANGED`. Raises `DecodeError` for
    what is not a Debezium event.
    """
    try:
        if event["op"] == "t":
            return _truncate_from_debezium(event)
        operation = _OPERATIONS[event["op"]]
        source = event.get("source") or {}
        before, after = event.get("before"), event.get("after")
        if source.get("connector") == "mongodb":
            table = f"{source.get('db')}.{source.get('collection')}"
            before = _from_extended_json(before) if isinstance(before, str) else before
            after = _from_extended_json(after) if isinstance(after, str) else after
            if isinstance(key, dict) and isinstance(key.get("id"), str):
                key = {"_id": _from_extended_json(key["id"])}
        else:
            table = f"{source.get('schema') or 'public'}.{source.get('table')}"
        position, committed = _position_and_commit_time(event, source)
        return Change(
            operation, table, new=_restore(after), old=_restore(before),
            key=key if isinstance(key, dict) else None, position=position,
            committed_at=committed, transaction=source.get("txId") or source.get("lsid"),
            snapshot=event["op"] == "r",
        )
    except (ArithmeticError, AttributeError, KeyError, OSError, TypeError, ValueError) as exc:
        raise DecodeError(f"not a Debezium event: {str(event)[:200]} ({exc})") from exc


def _position_and_commit_time(event: dict[str, Any], source: dict[str, Any]
                              ) -> tuple[str | None, datetime | None]:
    """A PostgreSQL event's position (its LSN and order in the transaction, as the feed writes
    positions) and commit time, None where the event does not say."""
    position = None
    lsn, transaction = source.get("lsn"), event.get("transaction") or {}
    if isinstance(lsn, int) and transaction.get("total_order"):
        position = f"{lsn:016X}:{transaction['total_order'] - 1:08X}"
    ts_ms = source.get("ts_ms")
    committed = None if ts_ms is None else datetime.fromtimestamp(ts_ms / 1000, timezone.utc)
    return position, committed


def _truncate_from_debezium(event: dict[str, Any]) -> Truncate:
    source = event.get("source") or {}
    if not source.get("table"):
        raise ValueError("a truncate event names no table")
    table = f"{source.get('schema') or 'public'}.{source['table']}"
    position, committed = _position_and_commit_time(event, source)
    return Truncate(table, position=position, committed_at=committed,
                    transaction=source.get("txId"))


def _from_extended_json(text: str) -> Any:
    """MongoDB Extended JSON as Python values; a `ValueError` for what bson cannot read."""
    from bson import errors, json_util

    try:
        return json_util.loads(text)
    except errors.BSONError as exc:  # an ObjectId of the wrong length, ...
        raise ValueError(str(exc)) from exc


def _restore(row: Any) -> dict[str, Any] | None:
    if not isinstance(row, dict) or UNAVAILABLE not in row.values():
        return row
    return {name: UNCHANGED if value == UNAVAILABLE else value for name, value in row.items()}


_OPERATIONS = {"c": Operation.INSERT, "r": Operation.INSERT, "u": Operation.UPDATE,
               "d": Operation.DELETE}


def database_of(url: str) -> str | None:
    """The database name of a PostgreSQL URL or conninfo, for ``source.db`` (None otherwise:
    MongoDB's database comes with each change's table)."""
    from changefeed.registry import is_postgresql_url

    if not url or ("://" in url and not is_postgresql_url(url)):
        return None
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        name = conninfo_to_dict(url).get("dbname")
    except psycopg.ProgrammingError:  # not valid: the feed reports that itself
        return None
    return str(name) if name else None


__all__ = [
    "UNAVAILABLE",
    "DebeziumEncoder",
    "Source",
    "change_from_debezium",
    "connector_of",
    "database_of",
    "envelope",
    "extended_json",
    "key",
    "line_encoder",
]


# The compiled encoder where it is built (the function above stays the reference).
line_encoder = _speedups.encoder_factory(line_encoder, "DebeziumEncoder")
