"""Change events to `Change`s. Pure: no I/O, unit-tested on recorded event documents.

`decode_event` maps one event document (what pymongo's change stream hands out, bson values
kept) to a `Change`, to a `StreamEnded` for the events that end a stream, or to None for a type
it does not know. `apply_update` rebuilds a document from a pre-image and an update
description when the server sent no document. The mapping itself is described in the
package docstring (`changefeed.backends.mongodb`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timezone
from typing import Any

from bson import Binary

from changefeed.backends.mongodb.positions import token_position
from changefeed.change import Change, Operation, Position

log = logging.getLogger("changefeed.mongodb")

ENDING_TYPES = ("invalidate", "drop", "rename", "dropDatabase")
"""Event types that end a collection's change stream; always selected by the server match."""

_OPERATIONS = {
    "insert": Operation.INSERT,
    "update": Operation.UPDATE,
    "replace": Operation.UPDATE,
    "delete": Operation.DELETE,
}


@dataclass(frozen=True)
class StreamEnded:
    """What `decode_event` returns for an event that ends the change stream.

    ``reason`` is the event's ``operationType``; ``message`` one line for humans; ``position``
    the event's resume token. ``final`` is True for ``invalidate``, the stream's very last
    event (``drop``, ``rename`` and ``dropDatabase`` of the watched collection precede one).
    """

    reason: str
    message: str
    position: Position = None

    @property
    def final(self) -> bool:
        return self.reason == "invalidate"


def operation_types(operation: int) -> list[str]:
    """The ``operationType`` values to ask the server for, for an `Operation` mask.

    The events that end a stream (invalidate, drop, rename, dropDatabase) are always included,
    so a feed notices its end.
    """
    operation = Operation(operation)
    types: list[str] = []
    if operation & Operation.INSERT:
        types.append("insert")
    if operation & Operation.UPDATE:
        types += ["update", "replace"]
    if operation & Operation.DELETE:
        types.append("delete")
    return types + list(ENDING_TYPES)


def decode_event(
    event: Mapping[str, Any], table: str, *, full_document: str | None = "updateLookup"
) -> Change | StreamEnded | None:
    """Turn one change event document into a `Change`, a `StreamEnded`, or None (skipped).

    ``table`` names the watched collection for events without a namespace (invalidate).
    ``full_document`` is the option the stream was opened with: it tells whether an update's
    ``fullDocument`` was looked up later ("updateLookup") or is a post-image.
    """
    kind = event.get("operationType")
    ns = event.get("ns")
    if ns:
        coll = ns.get("coll")
        table = f"{ns.get('db')}.{coll}" if coll is not None else table
    token = event.get("_id")
    position = token_position(token) if token is not None else None

    operation = _OPERATIONS.get(kind)
    if operation is None:
        if kind in ENDING_TYPES:
            return StreamEnded(kind, _ending_message(kind, table, event), position)
        log.debug("skipping a %r event on %s", kind, table)
        return None

    key = event.get("documentKey")
    wall_time = event.get("wallTime")
    if wall_time is not None:
        committed_at = wall_time if wall_time.tzinfo else wall_time.replace(tzinfo=timezone.utc)
    else:
        cluster_time = event.get("clusterTime")
        committed_at = cluster_time.as_datetime() if cluster_time is not None else None
    transaction = _transaction(event) if "txnNumber" in event else None
    before = event.get("fullDocumentBeforeChange")
    if operation is Operation.INSERT:
        return Change(
            operation, table, event.get("fullDocument"), None, key, position, committed_at,
            transaction,
        )
    if operation is Operation.DELETE:
        old = before if before is not None else key
        return Change(operation, table, None, old, key, position, committed_at, transaction)

    new = event.get("fullDocument")
    old = before if before is not None else key
    meta: dict[str, Any] | None = None
    if kind == "update":
        description = _update_description(event.get("updateDescription") or {})
        if new is not None:
            source = "lookup" if full_document == "updateLookup" else "post-image"
        elif before is not None:
            new = apply_update(before, description)
            source = "pre-image+update"
        else:
            source = "missing"
        meta = {"update_description": description, "new_source": source}
    return Change(operation, table, new, old, key, position, committed_at, transaction, False, meta)


def snapshot_change(document: dict[str, Any], table: str, position: Position) -> Change:
    """A document read by the snapshot prefeed, as a snapshot INSERT."""
    return Change(
        Operation.INSERT, table, document, None, {"_id": document.get("_id")}, position,
        None, None, True,
    )


def apply_update(document: Mapping[str, Any], description: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with an update description applied (truncations, then sets, then unsets).

    ``description`` is in the shape of ``meta["update_description"]`` (``updated_fields``,
    ``removed_fields``, ``truncated_arrays``); ``document`` is left untouched. Paths are
    dotted; a numeric part indexes an array. Field names containing dots cannot be told apart
    from paths here (MongoDB reports them only with showExpandedEvents).
    """
    result = copy.deepcopy(dict(document))
    for truncated in description.get("truncated_arrays") or ():
        parent, last = _walk(result, truncated["field"])
        array = _child(parent, last)
        if isinstance(array, list):
            del array[truncated["newSize"]:]
    for path, value in (description.get("updated_fields") or {}).items():
        parent, last = _walk(result, path, create=True)
        if isinstance(parent, list):
            index = int(last)
            parent.extend([None] * (index + 1 - len(parent)))
            parent[index] = value
        elif isinstance(parent, dict):
            parent[last] = value
    for path in description.get("removed_fields") or ():
        parent, last = _walk(result, path)
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            parent[int(last)] = None  # $unset of an array element leaves null
    return result


def _walk(document: dict[str, Any], path: str, *, create: bool = False) -> tuple[Any, str]:
    """The container of ``path``'s last part (None if missing), and that part."""
    parts = path.split(".")
    node: Any = document
    for part in parts[:-1]:
        child = _child(node, part)
        if child is None and create and isinstance(node, dict):
            child = node[part] = {}
        node = child
        if node is None:
            break
    return node, parts[-1]


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _update_description(description: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "updated_fields": dict(description.get("updatedFields") or {}),
        "removed_fields": list(description.get("removedFields") or []),
        "truncated_arrays": [dict(t) for t in description.get("truncatedArrays") or []],
    }


def _transaction(event: Mapping[str, Any]) -> str:
    lsid = event.get("lsid") or {}
    session = lsid.get("id")
    if isinstance(session, Binary) and session.subtype in (3, 4):
        session = session.as_uuid(session.subtype)
    return f"{session}:{int(event['txnNumber'])}"


def _ending_message(kind: str, table: str, event: Mapping[str, Any]) -> str:
    if kind == "drop":
        return f"collection {table} was dropped; the change stream ended"
    if kind == "rename":
        to = event.get("to") or {}
        target = f"{to.get('db')}.{to.get('coll')}"
        return (
            f"collection {table} was renamed to {target}; the change stream ended"
            f" (watch {target} to follow it)"
        )
    if kind == "dropDatabase":
        database = (event.get("ns") or {}).get("db") or table.partition(".")[0]
        return f"database {database} was dropped; the change stream ended"
    return (
        f"the change stream of {table} was invalidated (its collection was dropped or renamed);"
        " the change stream ended"
    )


__all__ = [
    "ENDING_TYPES",
    "StreamEnded",
    "apply_update",
    "decode_event",
    "operation_types",
    "snapshot_change",
]
