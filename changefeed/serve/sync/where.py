"""A shape's ``where``: Electric's SQL subset, compiled into a Python predicate over a logged row.

The text is parsed by sqlglot (PostgreSQL dialect) and never put into SQL. What it takes:
comparisons (``= <> != < <= > >=``, ``IS [NOT] DISTINCT FROM``), ``AND``, ``OR``, ``NOT``,
``[NOT] IN (...)``, ``[NOT] BETWEEN``, ``IS [NOT] NULL``, ``IS [NOT] TRUE/FALSE``,
``[NOT] LIKE``/``ILIKE``, ``+ - * / %``, ``lower``, ``upper``, ``length``, ``coalesce``, casts
(``'2024-01-01'::timestamptz``, ``CAST(x AS int)``), positional parameters (``$1`` from
``params[1]``), and boolean columns on their own. Literals take the type of the column they are
compared with, as PostgreSQL types an unknown literal; logic is SQL's three-valued one (a row
matches only when the ``where`` is true, not null). Anything else is a `WhereError` with one
line naming it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlglot
from sqlglot import exp

from changefeed.serve.sync.values import TableInfo, parse_literal, to_python

Row = Mapping[str, Any]
Getter = Callable[[Row], Any]


class WhereError(ValueError):
    """A ``where`` that cannot be compiled: its message is the one-line reason."""


# -- typed expressions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expr:
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


class _Compiler:
    def __init__(self, table: TableInfo, params: Mapping[str, str]) -> None:
        self.table = table
        self.params = params
        self.used_params: set[str] = set()

    def column(self, node: exp.Column) -> _Expr:
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
        return _Expr(get, "array" if dims else kind)

    def compile(self, node: exp.Expression) -> _Expr:
        handler = getattr(self, f"_{type(node).__name__.lower()}", None)
        if handler is None:
            raise WhereError(f"where: {_describe(node)} is not supported")
        compiled = handler(node)
        if node.args.get("negate") and not isinstance(node, exp.Is):  # NOT LIKE, NOT BETWEEN
            inner = compiled.get

            def negate(row: Row) -> bool | None:
                value = inner(row)
                return None if value is None else not value
            return _Expr(negate, "bool")
        return compiled

    # literals and parameters
    def _column(self, node: exp.Column) -> _Expr:
        return self.column(node)

    def _literal(self, node: exp.Literal) -> _Expr:
        text = node.this
        if node.is_string:
            return _Expr(lambda row: text, None, text)
        try:
            value: Any = int(text)
            kind = "int"
        except ValueError:
            try:
                value, kind = Decimal(text), "numeric"
            except InvalidOperation:
                raise WhereError(f"where: bad number {text!r}") from None
        return _Expr(lambda row: value, kind)

    def _boolean(self, node: exp.Boolean) -> _Expr:
        value = bool(node.this)
        return _Expr(lambda row: value, "bool")

    def _null(self, node: exp.Null) -> _Expr:
        return _Expr(lambda row: None, None, None)

    def _parameter(self, node: exp.Parameter) -> _Expr:
        number = node.this.this if isinstance(node.this, exp.Literal) else str(node.this)
        if str(number) not in self.params:
            raise WhereError(f"where uses ${number} but params[{number}] is not given")
        self.used_params.add(str(number))
        text = self.params[str(number)]
        return _Expr(lambda row: text, None, text)

    def _placeholder(self, node: exp.Placeholder) -> _Expr:
        raise WhereError("where: use $1, $2... with params[1], params[2]... for parameters")

    def _paren(self, node: exp.Paren) -> _Expr:
        return self.compile(node.this)

    def _cast(self, node: exp.Cast) -> _Expr:
        target = _CASTS.get(node.to.this.name if hasattr(node.to.this, "name") else "")
        if target is None:
            raise WhereError(f"where: cast to {node.to.sql('postgres')} is not supported")
        inner = self.compile(node.this)
        if inner.kind is None and inner.literal is not None:
            value = self.literal_as(inner, target)
            return _Expr(lambda row: value, target)
        get = inner.get

        def cast(row: Row) -> Any:
            value = get(row)
            if value is None:
                return None
            if target == "text":
                return _text_of(value)
            try:
                return parse_literal(target, _text_of(value))
            except ValueError:
                return None
        return _Expr(cast, target)

    # logic
    def _and(self, node: exp.And) -> _Expr:
        left, right = self.condition(node.this), self.condition(node.expression)

        def both(row: Row) -> bool | None:
            a = left(row)
            if a is False:
                return False
            b = right(row)
            if b is False:
                return False
            return None if a is None or b is None else True
        return _Expr(both, "bool")

    def _or(self, node: exp.Or) -> _Expr:
        left, right = self.condition(node.this), self.condition(node.expression)

        def either(row: Row) -> bool | None:
            a = left(row)
            if a is True:
                return True
            b = right(row)
            if b is True:
                return True
            return None if a is None or b is None else False
        return _Expr(either, "bool")

    def _not(self, node: exp.Not) -> _Expr:
        inner = self.condition(node.this)

        def negate(row: Row) -> bool | None:
            value = inner(row)
            return None if value is None else not value
        return _Expr(negate, "bool")

    def condition(self, node: exp.Expression) -> Getter:
        compiled = self.compile(node)
        if compiled.kind not in ("bool", None) or (compiled.kind is None and compiled.literal):
            if compiled.kind is None and compiled.literal is not None:
                value = self.literal_as(compiled, "bool")
                return lambda row: value
            raise WhereError(f"where: {node.sql('postgres')} is not a boolean")
        return compiled.get

    # comparisons
    def pair(self, left: _Expr, right: _Expr, what: str) -> tuple[Getter, Getter]:
        """Both sides made comparable: an untyped literal takes the other side's kind."""
        if left.kind is None and left.literal is not None and right.kind not in (None, "array"):
            left = _Expr(_const(self.literal_as(left, right.kind)), right.kind)
        if right.kind is None and right.literal is not None and left.kind not in (None, "array"):
            right = _Expr(_const(self.literal_as(right, left.kind)), left.kind)
        lk, rk = left.kind, right.kind
        if lk is not None and rk is not None and _family(lk) != _family(rk):
            raise WhereError(f"where: cannot compare {lk} with {rk} in {what}")
        if lk is not None and rk is not None and _family(lk) == "time" and lk != rk:
            widen = _widen(lk)
            lget, rget = left.get, right.get
            return (lambda row: widen(lget(row))), (lambda row: widen(rget(row)))
        return left.get, right.get

    def literal_as(self, literal: _Expr, kind: str | None) -> Any:
        assert literal.literal is not None
        if kind is None:
            return literal.literal
        try:
            return parse_literal(kind, literal.literal)
        except ValueError as exc:
            raise WhereError(f"where: {exc}") from None

    def _comparison(self, node: exp.Expression, compare: Callable[[Any, Any], bool]) -> _Expr:
        left, right = self.pair(self.compile(node.this), self.compile(node.expression),
                                node.sql("postgres"))

        def test(row: Row) -> bool | None:
            a, b = left(row), right(row)
            if a is None or b is None:
                return None
            try:
                return compare(a, b)
            except (TypeError, InvalidOperation):
                return None
        return _Expr(test, "bool")

    def _eq(self, node: exp.EQ) -> _Expr:
        return self._comparison(node, operator.eq)

    def _neq(self, node: exp.NEQ) -> _Expr:
        return self._comparison(node, operator.ne)

    def _lt(self, node: exp.LT) -> _Expr:
        return self._comparison(node, operator.lt)

    def _lte(self, node: exp.LTE) -> _Expr:
        return self._comparison(node, operator.le)

    def _gt(self, node: exp.GT) -> _Expr:
        return self._comparison(node, operator.gt)

    def _gte(self, node: exp.GTE) -> _Expr:
        return self._comparison(node, operator.ge)

    def _distinct(self, node: exp.Expression, distinct: bool) -> _Expr:
        left, right = self.pair(self.compile(node.this), self.compile(node.expression),
                                node.sql("postgres"))

        def test(row: Row) -> bool:
            a, b = left(row), right(row)
            same = (a is None and b is None) or (a is not None and b is not None and a == b)
            return not same if distinct else same
        return _Expr(test, "bool")

    def _nullsafeneq(self, node: exp.Expression) -> _Expr:
        return self._distinct(node, True)

    def _nullsafeeq(self, node: exp.Expression) -> _Expr:
        return self._distinct(node, False)

    def _in(self, node: exp.In) -> _Expr:
        if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
            raise WhereError(f"where: {node.sql('postgres')}: IN takes a list of values only")
        subject = self.compile(node.this)
        options = [self.pair(subject, self.compile(item), node.sql("postgres"))[1]
                   for item in node.expressions]
        if not options:
            raise WhereError("where: IN needs at least one value")
        get = subject.get

        def test(row: Row) -> bool | None:
            value = get(row)
            if value is None:
                return None
            unknown = False
            for option in options:
                candidate = option(row)
                if candidate is None:
                    unknown = True
                elif candidate == value:
                    return True
            return None if unknown else False
        return _Expr(test, "bool")

    def _between(self, node: exp.Between) -> _Expr:
        subject = self.compile(node.this)
        _, low = self.pair(subject, self.compile(node.args["low"]), node.sql("postgres"))
        get, high = self.pair(subject, self.compile(node.args["high"]), node.sql("postgres"))

        def test(row: Row) -> bool | None:
            value, a, b = get(row), low(row), high(row)
            if value is None or a is None or b is None:
                return None
            try:
                return a <= value <= b
            except TypeError:
                return None
        return _Expr(test, "bool")

    def _is(self, node: exp.Is) -> _Expr:
        subject = self.compile(node.this)
        target = node.expression
        negate = bool(node.args.get("negate"))
        get = subject.get
        if isinstance(target, exp.Null):
            def test(row: Row) -> bool:
                return (get(row) is None) != negate
            return _Expr(test, "bool")
        if isinstance(target, exp.Boolean):
            wanted = bool(target.this)

            def truth(row: Row) -> bool:
                return (get(row) is wanted) != negate
            return _Expr(truth, "bool")
        raise WhereError(f"where: {node.sql('postgres')} is not supported")

    def _like(self, node: exp.Like, flags: int = 0) -> _Expr:
        subject = self.compile(node.this)
        pattern = self.compile(node.expression)
        escape = node.args.get("escape")
        escape_char = "\\"
        if escape is not None:
            escape_char = str(self.compile(escape).get({}))
        if pattern.literal is None and pattern.kind is None:
            return _Expr(lambda row: None, "bool")
        if pattern.literal is None:
            raise WhereError("where: LIKE takes a literal pattern")
        regex = re.compile(_like_regex(pattern.literal, escape_char), flags | re.DOTALL)
        get = subject.get

        def test(row: Row) -> bool | None:
            value = get(row)
            if value is None:
                return None
            return regex.fullmatch(_text_of(value)) is not None
        return _Expr(test, "bool")

    def _ilike(self, node: exp.ILike) -> _Expr:
        return self._like(node, re.IGNORECASE)

    def _escape(self, node: exp.Escape) -> _Expr:
        like = node.this
        like.set("escape", node.expression)
        return self.compile(like)

    # values
    def _arithmetic(self, node: exp.Expression, apply: Callable[[Any, Any], Any]) -> _Expr:
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
        return _Expr(compute, kind)

    def _add(self, node: exp.Add) -> _Expr:
        return self._arithmetic(node, operator.add)

    def _sub(self, node: exp.Sub) -> _Expr:
        return self._arithmetic(node, operator.sub)

    def _mul(self, node: exp.Mul) -> _Expr:
        return self._arithmetic(node, operator.mul)

    def _div(self, node: exp.Div) -> _Expr:
        return self._arithmetic(node, operator.truediv)

    def _mod(self, node: exp.Mod) -> _Expr:
        return self._arithmetic(node, operator.mod)

    def _neg(self, node: exp.Neg) -> _Expr:
        inner = self.compile(node.this)
        if inner.kind not in _NUMBERS:
            raise WhereError(f"where: -{node.this.sql('postgres')} is not a number")
        get = inner.get
        return _Expr(lambda row: None if (v := get(row)) is None else -v, inner.kind)

    def _text_function(self, node: exp.Expression, apply: Callable[[str], Any],
                       kind: str) -> _Expr:
        inner = self.compile(node.this)
        get = inner.get
        if inner.literal is not None and inner.kind is None:
            value = apply(inner.literal)
            return _Expr(lambda row: value, kind)

        def call(row: Row) -> Any:
            value = get(row)
            return None if value is None else apply(_text_of(value))
        return _Expr(call, kind)

    def _lower(self, node: exp.Lower) -> _Expr:
        return self._text_function(node, str.lower, "text")

    def _upper(self, node: exp.Upper) -> _Expr:
        return self._text_function(node, str.upper, "text")

    def _length(self, node: exp.Length) -> _Expr:
        return self._text_function(node, len, "int")

    def _coalesce(self, node: exp.Coalesce) -> _Expr:
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
        return _Expr(first, kind)


def _const(value: Any) -> Getter:
    return lambda row: value


def _text_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)


def _like_regex(pattern: str, escape: str) -> str:
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if escape and char == escape and index + 1 < len(pattern):
            out.append(re.escape(pattern[index + 1]))
            index += 2
            continue
        out.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        index += 1
    return "".join(out)


def _describe(node: exp.Expression) -> str:
    if isinstance(node, (exp.Subquery, exp.Select, exp.Exists)):
        return "a subquery"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name().lower()}()"
    text = node.sql("postgres")
    return text if len(text) <= 60 else text[:57] + "..."


def compile_where(text: str, table: TableInfo,
                  params: Mapping[str, str] | None = None) -> tuple[Callable[[Row], bool], str]:
    """``text`` compiled into a predicate over a logged row of ``table``, and its normal form
    (sqlglot's SQL, parameters in place), which identifies the shape. Raises `WhereError`."""
    params = params or {}
    try:
        statements = sqlglot.parse(text, dialect="postgres")
    except sqlglot.errors.ParseError as exc:
        first = exc.errors[0]["description"] if exc.errors else str(exc)
        raise WhereError(f"where: cannot parse {text!r}: {first}") from None
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise WhereError("where: give one expression (no ';')")
    tree = statements[0]
    if isinstance(tree, (exp.Select, exp.Command, exp.DDL, exp.DML, exp.Block)) or not isinstance(
            tree, exp.Expression) or isinstance(tree, exp.Query):
        raise WhereError(f"where: {_describe(tree)} is not an expression")
    compiler = _Compiler(table, params)
    predicate = compiler.condition(tree)
    unused = set(params) - compiler.used_params
    if unused:
        raise WhereError(f"params[{sorted(unused)[0]}] is given but the where does not use it")
    normal = tree.sql("postgres")
    if params:
        normal += " -- " + "|".join(f"${k}={params[k]}" for k in sorted(params))

    def matches(row: Row) -> bool:
        return predicate(row) is True
    return matches, normal


__all__ = ["Row", "WhereError", "compile_where"]
