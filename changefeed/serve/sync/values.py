"""Columns of a served table and what their values look like on each side.

The shape log keeps rows in changefeed's own JSON (the encoding of ``--format change``: numbers,
strings for numeric and dates, base64 for bytea, nested JSON for json). Three readers need
other forms, and each conversion is done per column, by the column's type:

* `to_pg_text`: PostgreSQL's text output, which Electric's HTTP API sends (``DateStyle ISO``,
  ``TimeZone UTC``, ``IntervalStyle iso_8601``, ``bytea_output hex``), and which Mobync writes
  go back through (``%s::type`` in SQL: PostgreSQL parses its own text);
* `to_python`: typed values to evaluate a shape's ``where`` on (`datetime`, `Decimal`...);
* `parse_literal`: a ``where`` literal such as ``'2024-01-01'`` read as the type it is
  compared with, as PostgreSQL types an unknown literal.

`Column` and `TableInfo` come from the catalog (`load_table`); ``kind`` groups PostgreSQL types
by how their values behave (``int``, ``numeric``, ``timestamptz``...), ``type`` keeps the name
Electric's ``electric-schema`` header reports.
"""

from __future__ import annotations

import base64
import hashlib
import math
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from changefeed.formats.codec import dumps

KINDS = {
    "int2": "int", "int4": "int", "int8": "int", "oid": "int",
    "float4": "float", "float8": "float",
    "numeric": "numeric", "money": "numeric",
    "bool": "bool",
    "text": "text", "varchar": "text", "bpchar": "text", "name": "text", "citext": "text",
    "char": "text",
    "uuid": "uuid",
    "json": "json", "jsonb": "json",
    "bytea": "bytea",
    "date": "date",
    "timestamp": "timestamp", "timestamptz": "timestamptz",
    "time": "time", "timetz": "timetz",
    "interval": "interval",
}
"""PostgreSQL type names by kind; any other type (enums, inet...) is ``text``-like."""


@dataclass(frozen=True)
class Column:
    """One column: its name, PostgreSQL type (element type for arrays), array dimensions."""

    name: str
    type: str
    kind: str
    dims: int = 0
    not_null: bool = False
    pk_index: int | None = None
    sql_type: str = "text"
    """The column's type as SQL (``format_type``), for casts in Mobync writes."""
    modifiers: dict[str, Any] = field(default_factory=dict)
    """Electric's extra schema properties: ``max_length``, ``precision``, ``scale``..."""

    def schema(self) -> dict[str, Any]:
        """The column's entry in Electric's ``electric-schema`` header."""
        entry: dict[str, Any] = {"type": self.type}
        if self.dims:
            entry["dims"] = self.dims
        if self.not_null:
            entry["not_null"] = True
        if self.pk_index is not None:
            entry["pk_index"] = self.pk_index
        entry.update(self.modifiers)
        return entry


@dataclass(frozen=True)
class TableInfo:
    """A served table: qualified name, columns in order, primary key columns."""

    schema: str
    name: str
    columns: dict[str, Column]
    key: tuple[str, ...]

    @property
    def qualified(self) -> str:
        """``schema.name`` as changefeed names tables (`Change.table`)."""
        return f"{self.schema}.{self.name}"

    @property
    def display(self) -> str:
        """The name clients use: bare in ``public``, qualified elsewhere."""
        return self.name if self.schema == "public" else self.qualified

    @property
    def signature(self) -> str:
        """A digest of the columns and their types: it changes when the table's shape does."""
        text = "|".join(f"{c.name}:{c.sql_type}:{c.dims}" for c in self.columns.values())
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def electric_schema(self, columns: tuple[str, ...] | None = None) -> bytes:
        """The ``electric-schema`` header value for these columns (default: all)."""
        names = columns or tuple(self.columns)
        return orjson.dumps({name: self.columns[name].schema() for name in names})


COLUMNS_SQL = """
SELECT a.attname, coalesce(bt.typname, t.typname), coalesce(bet.typname, et.typname),
       a.attndims, a.attnotnull, format_type(a.atttypid, a.atttypmod),
       CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
       coalesce(bt.typcategory, t.typcategory)
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
LEFT JOIN pg_type bet ON bt.typcategory = 'A' AND bet.oid = bt.typelem
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

KEY_SQL = """
SELECT a.attname FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = %s AND i.indisprimary
ORDER BY array_position(i.indkey, a.attnum)
"""


def table_from_rows(schema: str, name: str, columns: list[tuple], key: list[str]) -> TableInfo:
    """A `TableInfo` from the rows of `COLUMNS_SQL` and `KEY_SQL` (pure, so it is tested
    without a server)."""
    result: dict[str, Column] = {}
    for attname, typname, elem, attndims, not_null, sql_type, typmod, category in columns:
        is_array = category == "A"
        base = elem if is_array else typname
        dims = max(int(attndims or 0), 1) if is_array else 0
        result[attname] = Column(
            name=attname, type=base, kind=KINDS.get(base, "text"), dims=dims,
            not_null=bool(not_null),
            pk_index=key.index(attname) if attname in key else None,
            sql_type=sql_type, modifiers=_modifiers(base, int(typmod)),
        )
    return TableInfo(schema, name, result, tuple(key))


def _modifiers(typname: str, typmod: int) -> dict[str, Any]:
    if typmod < 0:
        return {}
    if typname == "varchar":
        return {"max_length": typmod - 4}
    if typname == "bpchar":
        return {"length": typmod - 4}
    if typname == "numeric":
        return {"precision": ((typmod - 4) >> 16) & 0xFFFF, "scale": (typmod - 4) & 0xFFFF}
    if typname in ("time", "timetz", "timestamp", "timestamptz"):
        return {"precision": typmod}
    if typname in ("bit", "varbit"):
        return {"length": typmod}
    return {}


# -- JSON -> PostgreSQL text ---------------------------------------------------------------------


def to_pg_text(column: Column, value: Any) -> str | None:
    """``value`` (changefeed JSON) as PostgreSQL writes it: the text Electric sends, and the
    text a Mobync write gives to ``%s::type``. Raises ValueError on a value the type cannot
    take (a Mobync client sending ``"abc"`` for bytea)."""
    if value is None:
        return None
    if column.dims:
        if not isinstance(value, list):
            if isinstance(value, str) and value.startswith("{"):
                return value  # already an array literal
            raise ValueError(f"{column.name} is an array: give a JSON list")
        return _array_text(column.kind, value)
    return _scalar_text(column.kind, value)


def _scalar_text(kind: str, value: Any) -> str:
    if kind == "text" or kind == "uuid":
        if isinstance(value, (dict, list)):
            return _range_or_json(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"not an integer: {value!r}")
        return str(value)
    if kind == "bool":
        if isinstance(value, str):
            return value
        return "true" if value else "false"
    if kind == "numeric":
        return str(value)
    if kind == "float":
        return _float_text(value)
    if kind == "json":
        return dumps(value).decode()
    if kind == "bytea":
        if not isinstance(value, str):
            raise ValueError("bytea values are base64 strings")
        if value.startswith("\\x"):
            return value
        try:
            return "\\x" + base64.b64decode(value, validate=True).hex()
        except ValueError:
            raise ValueError(f"not base64: {value[:40]!r}") from None
    if kind in ("timestamp", "timestamptz", "time", "timetz"):
        return _time_text(str(value))
    return str(value)


def _float_text(value: Any) -> str:
    if isinstance(value, str):
        return value  # "NaN", "Infinity", "-Infinity" as changefeed writes them
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    text = repr(number)
    return text[:-2] if text.endswith(".0") else text


def _time_text(text: str) -> str:
    """ISO 8601 (``2024-01-02T03:04:05.500000+00:00``) as PostgreSQL writes it
    (``2024-01-02 03:04:05.5+00``); PostgreSQL's own texts (``infinity``) pass unchanged."""
    if len(text) > 10 and text[10] == "T":
        text = f"{text[:10]} {text[11:]}"
    head, sign, offset = _split_offset(text)
    if "." in head:
        head = head.rstrip("0").rstrip(".")
    if sign:
        if offset.endswith(":00"):
            offset = offset[:-3]
        return f"{head}{sign}{offset}"
    return head


def _split_offset(text: str) -> tuple[str, str, str]:
    """``time`` part and its UTC offset (``+``/``-`` and the rest), if any."""
    start = text.find(":")  # an offset comes after the time, whose first colon we skip
    if start < 0:
        return text, "", ""
    for index in range(len(text) - 1, start, -1):
        if text[index] in "+-":
            return text[:index], text[index], text[index + 1:]
    if text.endswith("Z"):
        return text[:-1], "+", "00"
    return text, "", ""


def _range_or_json(value: dict | list) -> str:
    if isinstance(value, dict) and value.get("empty") is True:
        return "empty"
    if isinstance(value, dict) and "bounds" in value:
        lower = "" if value.get("lower") is None else str(value["lower"])
        upper = "" if value.get("upper") is None else str(value["upper"])
        bounds = str(value["bounds"])
        return f"{bounds[0]}{lower},{upper}{bounds[1]}"
    return dumps(value).decode()


def _array_text(kind: str, items: list) -> str:
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(_array_text(kind, item))
        else:
            parts.append(_quote_element(_scalar_text(kind, item)))
    return "{" + ",".join(parts) + "}"


def _quote_element(text: str) -> str:
    if text == "" or text.upper() == "NULL" or any(c in text for c in '{}",\\ \t\n\r'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return text


# -- JSON -> Python, for where ------------------------------------------------------------------


def to_python(kind: str, value: Any, dims: int = 0) -> Any:
    """``value`` (changefeed JSON) as a Python value to compare: None stays None, a value that
    does not parse (PostgreSQL's ``infinity``) stays its text."""
    if value is None:
        return None
    if dims:
        if isinstance(value, list):
            return [to_python(kind, item, dims - 1 if dims > 1 else 0) for item in value]
        return value
    try:
        return _PARSERS[kind](value)
    except (ValueError, TypeError, InvalidOperation):
        return value


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, int):
        return value
    return int(str(value).strip())


def _as_float(value: Any) -> float:
    if isinstance(value, str):
        text = value.strip().lower()
        return {"nan": math.nan, "infinity": math.inf, "-infinity": -math.inf,
                "inf": math.inf, "-inf": -math.inf}.get(text) or float(text)
    return float(value)


def _as_decimal(value: Any) -> Decimal:
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(str(value).strip())


_TRUE = {"t", "true", "y", "yes", "on", "1"}
_FALSE = {"f", "false", "n", "no", "off", "0"}


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid input syntax for type boolean: {value!r}")


def _as_uuid(value: Any) -> str:
    return str(uuid.UUID(str(value)))


def _as_date(value: Any) -> date:
    return date.fromisoformat(str(value).strip()[:10])


def _as_timestamp(value: Any) -> datetime:
    parsed = datetime.fromisoformat(_iso(str(value)))
    if parsed.tzinfo is not None:  # a literal with an offset, read in TimeZone UTC
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def _as_timestamptz(value: Any) -> datetime:
    parsed = datetime.fromisoformat(_iso(str(value)))
    if parsed.tzinfo is None:  # the session's TimeZone is UTC
        return parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _as_time(value: Any) -> time:
    return time.fromisoformat(_iso_time(str(value).strip()))


def _iso(text: str) -> str:
    text = text.strip()
    if text.endswith(("+00", "-00")) or (len(text) > 3 and text[-3] in "+-" and text[-2:].isdigit()
                                         and ":" in text):
        text += ":00"  # PostgreSQL's short offset (+02) as Python reads it (+02:00)
    return text


def _iso_time(text: str) -> str:
    head, sign, offset = _split_offset(text)
    if sign and ":" not in offset:
        offset += ":00"
    return f"{head}{sign}{offset}"


_PARSERS: dict[str, Any] = {
    "int": _as_int,
    "float": _as_float,
    "numeric": _as_decimal,
    "bool": _as_bool,
    "text": str,
    "uuid": _as_uuid,
    "json": lambda value: value,
    "bytea": str,
    "date": _as_date,
    "timestamp": _as_timestamp,
    "timestamptz": _as_timestamptz,
    "time": _as_time,
    "timetz": _as_time,
    "interval": str,
}


def parse_literal(kind: str, text: str) -> Any:
    """A ``where`` literal's text read as a value of ``kind``, as PostgreSQL reads an unknown
    literal compared with a column. Raises ValueError with PostgreSQL's kind of message."""
    try:
        value = _PARSERS[kind](text)
    except (ValueError, TypeError, InvalidOperation):
        raise ValueError(f"invalid input syntax for type {kind}: {text!r}") from None
    if kind in ("timestamp", "timestamptz", "date") and isinstance(value, str):
        raise ValueError(f"invalid input syntax for type {kind}: {text!r}")
    return value


__all__ = ["COLUMNS_SQL", "KEY_SQL", "Column", "TableInfo", "parse_literal", "table_from_rows",
           "to_pg_text", "to_python"]
