"""Shapes: a table, a ``where`` and columns, and what each logged change means for a client.

The ``where`` is compiled into a Python predicate by `changefeed.serve.sync.where`.
A logged change becomes, for one shape (`Shape.view`), what the `subscription` stage makes of
it: an update whose old row was outside the ``where`` and whose new row is inside is an insert
for that client, inside then outside a delete, outside both nothing. The log keeps the whole
old row of every change (see `changefeed.serve.sync.log`), so this works whatever the table's
REPLICA IDENTITY.

With an owner column (``--owner-column``) a shape is also kept to its owner's rows: the
predicate is the ``where`` AND ``owner = <the token's owner>``, applied to every row the
shape hands out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from changefeed.serve.sync.values import TableInfo, to_python
from changefeed.serve.sync.where import WhereError, compile_where
from changefeed.serve.sync.where_values import Row


class ShapeError(ValueError):
    """A shape request that cannot be served as asked: its message is the one-line reason."""


@dataclass(frozen=True)
class View:
    """What one logged change is for one shape: the operation the client must apply, and the
    whole new and old rows (changefeed JSON) it is made from."""

    operation: str
    new: dict[str, Any] | None
    old: dict[str, Any] | None


class Shape:
    """A table, a ``where``, columns and an owner: which logged rows a client sees.

    ``digest`` identifies the definition (table and its column types, normal ``where``,
    columns, replica, owner); the handle adds the log's epoch (see `changefeed.serve.sync.log`).
    """

    def __init__(
        self,
        table: TableInfo,
        where: str | None = None,
        params: Mapping[str, str] | None = None,
        columns: tuple[str, ...] | None = None,
        replica: str = "default",
        owner_column: str | None = None,
        owner: Any = None,
    ) -> None:
        self.table = table
        self.replica = replica
        if replica not in ("default", "full"):
            raise ShapeError(f"replica must be default or full, not {replica!r}")
        if where is not None and where.strip():
            try:
                self.where_matches, normal = compile_where(where, table, params)
            except WhereError as exc:
                raise ShapeError(str(exc)) from None
        else:
            if params:
                raise ShapeError("params are given but there is no where")
            self.where_matches, normal = None, ""
        self.columns = columns if columns is not None else tuple(table.columns)
        self.owner_column = owner_column
        self.owner = None
        if owner_column is not None:
            column = table.columns.get(owner_column)
            if column is None:
                raise ShapeError(f"table {table.qualified} has no owner column {owner_column!r}")
            self.owner = to_python(column.kind, owner, column.dims)
            self.owner_kind, self.owner_dims = column.kind, column.dims
        material = "\n".join([
            table.qualified, table.signature, normal, ",".join(self.columns), replica,
            f"{owner_column}={owner!r}" if owner_column else "",
        ])
        self.digest = hashlib.sha256(material.encode()).hexdigest()[:16]

    def matches(self, row: Row | None) -> bool:
        """Whether ``row`` (changefeed JSON) is in the shape."""
        if row is None:
            return False
        if self.owner_column is not None:
            value = to_python(self.owner_kind, row.get(self.owner_column), self.owner_dims)
            if value is None or value != self.owner:
                return False
        return self.where_matches is None or self.where_matches(row)

    def view(self, operation: str, new: Row | None, old: Row | None) -> View | None:
        """The logged change (``operation`` ``i``, ``u`` or ``d``, whole rows) as this shape's
        client must apply it, or None when it does not concern the shape."""
        if operation == "i":
            return View("insert", dict(new), None) if self.matches(new) else None  # type: ignore[arg-type]
        if operation == "d":
            return View("delete", None, dict(old)) if self.matches(old) else None  # type: ignore[arg-type]
        was, now = self.matches(old), self.matches(new)
        if was and now:
            return View("update", dict(new), dict(old))  # type: ignore[arg-type]
        if now:
            return View("insert", dict(new), None)  # type: ignore[arg-type]
        if was:
            return View("delete", None, dict(old))  # type: ignore[arg-type]
        return None


def parse_columns(text: str, table: TableInfo) -> tuple[str, ...]:
    """Electric's ``columns`` parameter (``id,title,"Status-Check"``) checked against the table:
    known columns, the primary key included, no repeats."""
    names: list[str] = []
    for part in _split_identifiers(text):
        name = part[1:-1].replace('""', '"') if part.startswith('"') else part.lower()
        if not name:
            raise ShapeError(f"columns: empty name in {text!r}")
        if name not in table.columns:
            raise ShapeError(f"columns: unknown column {name!r} in {table.qualified}")
        if name in names:
            raise ShapeError(f"columns: {name!r} is given twice")
        names.append(name)
    missing = [key for key in table.key if key not in names]
    if missing:
        raise ShapeError(f"columns must include the primary key: {', '.join(missing)} missing")
    return tuple(sorted(names, key=list(table.columns).index))


def _split_identifiers(text: str) -> list[str]:
    parts, current, quoted, index = [], "", False, 0
    while index < len(text):
        char = text[index]
        if quoted:
            current += char
            if char == '"':
                if index + 1 < len(text) and text[index + 1] == '"':
                    current += '"'
                    index += 1
                else:
                    quoted = False
        elif char == '"':
            if current.strip():
                raise ShapeError(f"columns: bad quoting in {text!r}")
            current, quoted = '"', True
        elif char == ",":
            parts.append(current.strip())
            current = ""
        else:
            current += char
        index += 1
    if quoted:
        raise ShapeError(f"columns: unterminated quote in {text!r}")
    parts.append(current.strip())
    return parts


_IDENTIFIER = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)')


def parse_table(text: str) -> tuple[str, str]:
    """Electric's ``table`` parameter as (schema, name): ``issues`` is ``public.issues``,
    ``foo.issues`` and quoted names (``"Foo"."Bar"``) as PostgreSQL reads them."""
    if not text or not text.strip():
        raise ShapeError("table is required")
    parts, position, source = [], 0, text.strip()
    while True:
        match = _IDENTIFIER.match(source, position)
        if match is None:
            raise ShapeError(f"table: cannot read {text!r} as a table name")
        quoted, plain = match.groups()
        parts.append(quoted.replace('""', '"') if quoted is not None else plain.lower())
        position = match.end()
        if position == len(source):
            break
        if source[position] != "." or len(parts) == 2:
            raise ShapeError(f"table: cannot read {text!r} as a table name")
        position += 1
    return (parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0])


__all__ = ["Shape", "ShapeError", "View", "parse_columns", "parse_table"]
