"""The change dict: a `Change` as plain JSON data, ``Change.to_dict()``, and back again.

It is the ``change`` format: what ``changefeed run --format change`` writes, a Redis stream
entry holds and a Kafka record holds by default, so that a feed reading a log rebuilds the
change the sink wrote. JSON turns Decimals, datetimes inside rows, UUIDs and bytes into
strings; `change_from_dict` restores ``committed_at`` and the `UNCHANGED` columns.

``to_dict`` stays a method of the record (as on `SnapshotState`, `Message` and `Truncate`):
every item a feed yields gives its dict form the same way, and `changefeed.change` imports
nothing above it. A `Truncate` reads back from its dict (``"operation": "truncate"``) too.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import changefeed._speedups as _speedups
from changefeed.change import UNCHANGED, Change, Operation, Truncate
from changefeed.errors import DecodeError
from changefeed.formats.codec import dumps_line


def change_from_dict(data: dict[str, Any]) -> Change | Truncate:
    """Rebuild a `Change` (or a `Truncate`) from its ``to_dict()`` form (after a JSON round
    trip).

    Raises `DecodeError` for anything else (a delta, say).
    """
    try:
        operation = Operation[str(data["operation"]).upper()]
        committed_at = data.get("committed_at")
        if isinstance(committed_at, str):
            committed_at = datetime.fromisoformat(committed_at)
        if operation is Operation.TRUNCATE:
            table = data["table"]
            if not isinstance(table, str):
                raise TypeError(f"table {table!r} is not a name")
            return Truncate(
                table, position=data.get("position"), committed_at=committed_at,
                transaction=data.get("transaction"), cascade=bool(data.get("cascade")),
                restart_identity=bool(data.get("restart_identity")), meta=data.get("meta"),
            )
        new = data.get("new")
        if new is not None and data.get("unchanged"):
            new = {**new, **dict.fromkeys(data["unchanged"], UNCHANGED)}
        return Change(
            operation,
            data["table"],
            new=new,
            old=data.get("old"),
            key=data.get("key"),
            position=data.get("position"),
            committed_at=committed_at,
            transaction=data.get("transaction"),
            snapshot=bool(data.get("snapshot", False)),
            meta=data.get("meta"),
            schema_version=data.get("schema_version"),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"not a change: {str(data)[:200]} ({exc})") from exc


def change_line(item: Any) -> bytes:
    """The JSON line of a change's dict, or of another item a feed yields (a `SnapshotState`, a
    `Truncate`): what ``changefeed run --format change`` writes."""
    return dumps_line(item.to_dict())


def change_line_encoder() -> Callable[[Any], bytes]:
    """`change_line`, or the compiled encoder of the same bytes where it is built."""
    return change_line


__all__ = ["change_from_dict", "change_line", "change_line_encoder"]

# The compiled encoder where it is built (the function above stays the reference).
change_line_encoder = _speedups.encoder_factory(change_line_encoder, "ChangeEncoder")
