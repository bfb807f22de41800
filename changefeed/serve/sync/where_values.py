"""The values of a ``where``: columns, literals, parameters, casts, arithmetic and functions,
each compiled into how to read it from a logged row and its kind (`Typed`).

Literals take the kind of what they are compared with (`ValueCompiler.pair`), as PostgreSQL types
an unknown literal; ``changefeed.serve.sync.where`` builds the conditions on top of these.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlglot import exp

from changefeed.serve.sync.values import TableInfo, parse_literal, to_python

Row = Mapping[str, Any]
Getter = Callable[[Row], Any]


class WhereError(ValueError):
    """A ``where`` that cannot be compiled: its message is the one-line reason."""


@dataclass(frozen=True)
class Typed:
    """A compiled expression: how to get its value from a row, and its kind (None: an untyped
    literal, typed by what it is compared with; ``literal`` keeps its text for that)."""

    get: Getter
    kind: str | None
    literal: str | None = None


_NUMBERS = {"int", "numeric", "float"}
_TIMES = {"date", "timestamp", "timestamptz"}
_TEXTS = {"text", "uuid", "interval", "bytea"}

_CASTS = {
    "INT": "int", "BIGINT": "int", "SMALLINT": "int", "TINYINT": "int",
    "DECIMAL": "numeric", "BIGDECIMAL": "numeric", "MONEY": "numeric",
    "FLOAT": "float", "DOUBLE": "float",
    "BOOLEAN": "bool",
    "TEXT": "text", "VARCHAR": "text", "CHAR": "text", "NCHAR": "text", "NVARCHAR": "text",
    "NAME": "text", "BPCHAR": "text",
    "UUID": "uuid",
    "DATE": "date",
    "TIMESTAMP": "timestamp", "DATETIME": "timestamp",
    "TIMESTAMPTZ": "timestamptz", "TIMESTAMPLTZ": "timestamptz",
    "TIME": "time", "TIMETZ": "timetz",
    "JSON": "json", "JSONB": "json",
    "INTERVAL": "interval",
}


def _family(kind: str | None) -> str | None:
    if kind in _NUMBERS:
        return "number"
    if kind in _TIMES:
        return "time"
    if kind in _TEXTS:
        return "text"
    return kind


def _widen(kind: str) -> Callable[[Any], Any]:
    """Make date and timestamp values comparable with timestamptz ones (Python refuses to
    compare naive with aware datetimes, and dates with datetimes)."""
    def widen(value: Any) -> Any:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
        return value
    return widen


class ValueCompiler:
    """Compiles the value expressions of a ``where`` over ``table``; `compile` dispatches on the
    node's type to a ``_<type>`` method (the subclass in `changefeed.serve.sync.where` adds the
    conditions). Parameters used are noted in ``used_params``."""

    def __init__(self, table: TableInfo, params: Mapping[str, str]) -> None:
        self.table = table
        self.params = params
        self.used_params: set[str] = set()

    def column(self, node: exp.Column) -> Typed:
        if node.table and node.table not in (self.table.name, self.table.qualified):
            raise WhereError(f"where: column {node.sql('postgres')} is not of table"
                             f" {self.table.qualified}")
        identifier = node.this
        name = identifier.this if identifier.quoted else identifier.this.lower()
        column = self.table.columns.get(name)
        if column is None:
            raise WhereError(f"where: unknown column {name!r} in {self.table.qualified}")
        kind, dims = column.kind, column.dims

        def get(row: Row) -> Any:
            return to_python(kind, row.get(name), dims)
        return Typed(get, "array" if dims else kind)

    def compile(self, node: exp.Expression) -> Typed:
        handler = getattr(self, f"_{type(node).__name__.lower()}", None)
        if handler is None:
            raise WhereError(f"where: {describe(node)} is not supported")
        compiled = handler(node)
        if node.args.get("negate") and not isinstance(node, exp.Is):  # NOT LIKE, NOT BETWEEN
            inner = compiled.get

            def negate(row: Row) -> bool | None:
                value = inner(row)
                return None if value is None else not value
            return Typed(negate, "bool")
        return compiled

    # literals and parameters
    def _column(self, node: exp.Column) -> Typed:
        return self.column(node)

    def _literal(self, node: exp.Literal) -> Typed:
        text = node.this
        if node.is_string:
            return Typed(lambda row: text, None, text)
        try:
            value: Any = int(text)
            kind = "int"
        except ValueError:
            try:
                value, kind = Decimal(text), "numeric"
            except InvalidOperation:
                raise WhereError(f"where: bad number {text!r}") from None
        return Typed(lambda row: value, kind)

    def _boolean(self, node: exp.Boolean) -> Typed:
        value = bool(node.this)
        return Typed(lambda row: value, "bool")

    def _null(self, node: exp.Null) -> Typed:
        return Typed(lambda row: None, None, None)

    def _parameter(self, node: exp.Parameter) -> Typed:
        number = node.this.this if isinstance(node.this, exp.Literal) else str(node.this)
        if str(number) not in self.params:
            raise WhereError(f"where uses ${number} but params[{number}] is not given")
        self.used_params.add(str(number))
        text = self.params[str(number)]
        return Typed(lambda row: text, None, text)

    def _placeholder(self, node: exp.Placeholder) -> Typed:
        raise WhereError("where: use $1, $2... with params[1], params[2]... for parameters")

    def _paren(self, node: exp.Paren) -> Typed:
        return self.compile(node.this)

    def _cast(self, node: exp.Cast) -> Typed:
        target = _CASTS.get(node.to.this.name if hasattr(node.to.this, "name") else "")
        if target is None:
            raise WhereError(f"where: cast to {node.to.sql('postgres')} is not supported")
        inner = self.compile(node.this)
        if inner.kind is None and inner.literal is not None:
            value = self.literal_as(inner, target)
            return Typed(lambda row: value, target)
        get = inner.get

        def cast(row: Row) -> Any:
            value = get(row)
            if value is None:
                return None
            if target == "text":
                return text_of(value)
            try:
                return parse_literal(target, text_of(value))
            except ValueError:
                return None
        return Typed(cast, target)

    # making two sides comparable
    def pair(self, left: Typed, right: Typed, what: str) -> tuple[Getter, Getter]:
        """Both sides made comparable: an untyped literal takes the other side's kind."""
        if left.kind is None and left.literal is not None and right.kind not in (None, "array"):
            left = Typed(_const(self.literal_as(left, right.kind)), right.kind)
        if right.kind is None and right.literal is not None and left.kind not in (None, "array"):
            right = Typed(_const(self.literal_as(right, left.kind)), left.kind)
        lk, rk = left.kind, right.kind
        if lk is not None and rk is not None and _family(lk) != _family(rk):
            raise WhereError(f"where: cannot compare {lk} with {rk} in {what}")
        if lk is not None and rk is not None and _family(lk) == "time" and lk != rk:
            widen = _widen(lk)
            lget, rget = left.get, right.get
            return (lambda row: widen(lget(row))), (lambda row: widen(rget(row)))
        return left.get, right.get

    def literal_as(self, literal: Typed, kind: str | None) -> Any:
        assert literal.literal is not None
        if kind is None:
            return literal.literal
        try:
            return parse_literal(kind, literal.literal)
        except ValueError as exc:
            raise WhereError(f"where: {exc}") from None

    # values
    def _arithmetic(self, node: exp.Expression, apply: Callable[[Any, Any], Any]) -> Typed:
        left, right = self.compile(node.this), self.compile(node.expression)
        kinds = {left.kind, right.kind} - {None}
        if not kinds <= _NUMBERS:
            raise WhereError(f"where: {node.sql('postgres')}: arithmetic works on numbers only")
        kind = "float" if "float" in kinds else "numeric" if "numeric" in kinds else "int"
        lget, rget = self.pair(left, right, node.sql("postgres"))
        integer = kind == "int" and isinstance(node, exp.Div)

        def compute(row: Row) -> Any:
            a, b = lget(row), rget(row)
            if a is None or b is None:
                return None
            try:
                if integer:
                    quotient = abs(a) // abs(b)
                    return quotient if (a >= 0) == (b >= 0) else -quotient
                return apply(a, b)
            except (ZeroDivisionError, InvalidOperation, TypeError):
                return None
        return Typed(compute, kind)

    def _add(self, node: exp.Add) -> Typed:
        return self._arithmetic(node, operator.add)

    def _sub(self, node: exp.Sub) -> Typed:
        return self._arithmetic(node, operator.sub)

    def _mul(self, node: exp.Mul) -> Typed:
        return self._arithmetic(node, operator.mul)

    def _div(self, node: exp.Div) -> Typed:
        return self._arithmetic(node, operator.truediv)

    def _mod(self, node: exp.Mod) -> Typed:
        return self._arithmetic(node, operator.mod)

    def _neg(self, node: exp.Neg) -> Typed:
        inner = self.compile(node.this)
        if inner.kind not in _NUMBERS:
            raise WhereError(f"where: -{node.this.sql('postgres')} is not a number")
        get = inner.get
        return Typed(lambda row: None if (v := get(row)) is None else -v, inner.kind)

    def _text_function(self, node: exp.Expression, apply: Callable[[str], Any],
                       kind: str) -> Typed:
        inner = self.compile(node.this)
        get = inner.get
        if inner.literal is not None and inner.kind is None:
            value = apply(inner.literal)
            return Typed(lambda row: value, kind)

        def call(row: Row) -> Any:
            value = get(row)
            return None if value is None else apply(text_of(value))
        return Typed(call, kind)

    def _lower(self, node: exp.Lower) -> Typed:
        return self._text_function(node, str.lower, "text")

    def _upper(self, node: exp.Upper) -> Typed:
        return self._text_function(node, str.upper, "text")

    def _length(self, node: exp.Length) -> Typed:
        return self._text_function(node, len, "int")

    def _coalesce(self, node: exp.Coalesce) -> Typed:
        parts = [self.compile(node.this), *(self.compile(e) for e in node.expressions)]
        kind = next((part.kind for part in parts if part.kind is not None), None)
        getters = [part.get if part.kind is not None or part.literal is None
                   else _const(self.literal_as(part, kind)) for part in parts]

        def first(row: Row) -> Any:
            for get in getters:
                value = get(row)
                if value is not None:
                    return value
            return None
        return Typed(first, kind)


def _const(value: Any) -> Getter:
    return lambda row: value


def text_of(value: Any) -> str:
    """A value as PostgreSQL would print it as text (for casts, LIKE and text functions)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)


def describe(node: exp.Expression) -> str:
    """How a message names an expression the compiler does not take."""
    if isinstance(node, (exp.Subquery, exp.Select, exp.Exists)):
        return "a subquery"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name().lower()}()"
    text = node.sql("postgres")
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["Getter", "Row", "Typed", "ValueCompiler", "WhereError", "describe", "text_of"]
