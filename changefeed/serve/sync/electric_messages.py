"""Electric's wire format for one shape, pure: the offsets a client sends back, and the JSON
messages of log entries, snapshot rows and differences (the HTTP side is `electric`)."""

from __future__ import annotations

from typing import Any

import orjson

from changefeed.serve.sync.shapes import Shape, View
from changefeed.serve.sync.tail import Entry
from changefeed.serve.sync.values import to_pg_text


class BadRequest(Exception):
    """A 400 with a one-line reason."""


def parse_offset(text: str | None) -> int | str:
    """``-1``, ``now``, or the log sequence of ``<seq>_<n>``."""
    if text is None or text == "":
        raise BadRequest("offset is required: -1 for the initial sync")
    if text in ("-1", "now"):
        return text
    seq, sep, rest = text.partition("_")
    if not sep or not seq.isdigit() or not rest.isdigit():
        raise BadRequest(f"offset {text!r} is not -1, now or an offset this server gave")
    return int(seq)


def offset_text(seq: int) -> str:
    return f"{seq}_0"


class Messages:
    """Turns log entries into Electric messages for one shape (pure)."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        table = shape.table
        self.columns = [table.columns[name] for name in shape.columns]
        self.key_columns = [table.columns[name] for name in table.key]
        self.relation = [table.schema, table.name]
        self.prefix = f'"{_quote(table.schema)}"."{_quote(table.name)}"'

    def key(self, row: dict[str, Any]) -> str:
        parts = [_quote(to_pg_text(c, row.get(c.name)) or "") for c in self.key_columns]
        return self.prefix + "".join(f'/"{part}"' for part in parts)

    def values(self, row: dict[str, Any], columns: Any = None) -> dict[str, str | None]:
        return {c.name: to_pg_text(c, row.get(c.name)) for c in (columns or self.columns)}

    def message(self, view: View, headers: dict[str, Any]) -> bytes | None:
        operation = view.operation
        full = self.shape.replica == "full"
        body: dict[str, Any] = {"headers": {"operation": operation, **headers}}
        if operation == "insert":
            assert view.new is not None
            body["key"] = self.key(view.new)
            body["value"] = self.values(view.new)
        elif operation == "delete":
            assert view.old is not None
            body["key"] = self.key(view.old)
            body["value"] = self.values(view.old, None if full else self.key_columns)
        else:
            assert view.new is not None and view.old is not None
            changed = [c for c in self.columns
                       if view.new.get(c.name) != view.old.get(c.name)]
            if not changed:
                return None  # nothing this client sees changed
            body["key"] = self.key(view.new)
            if full:
                body["value"] = self.values(view.new)
                body["old_value"] = self.values(view.old, changed)
            else:
                keys = [c for c in self.key_columns if c not in changed]
                body["value"] = self.values(view.new, keys + changed)
        return orjson.dumps(body)

    def of_entry(self, entry: Entry) -> bytes | None:
        view = self.shape.view(entry.op, entry.new, entry.old)
        if view is None:
            return None
        headers = {"relation": self.relation, "lsn": str(entry.seq), "op_position": 0}
        if entry.xid is not None:
            headers["txids"] = [entry.xid]
        return self.message(view, headers)

    def of_row(self, row: dict[str, Any]) -> bytes | None:
        """A snapshot row as an insert, if it is in the shape."""
        if not self.shape.matches(row):
            return None
        return self.message(View("insert", row, None), {"relation": self.relation})

    def of_difference(self, row: dict[str, Any] | None, key: dict[str, Any]) -> bytes | None:
        """A key changed since the client's offset: its row now (an insert, which the
        client's store takes as an upsert) or a delete when it is gone or out of the shape."""
        if row is not None and self.shape.matches(row):
            return self.message(View("insert", row, None), {"relation": self.relation})
        return orjson.dumps({"headers": {"operation": "delete", "relation": self.relation},
                             "key": self.key(key), "value": self.values(key, self.key_columns)})


def _quote(text: str) -> str:
    return text.replace('"', '""')
