"""A shape's ``where``: Electric's SQL subset, compiled into a Python predicate over a logged row.

The text is parsed by sqlglot (PostgreSQL dialect) and never put into SQL. What it takes:
comparisons (``= <> != < <= > >=``, ``IS [NOT] DISTINCT FROM``), ``AND``, ``OR``, ``NOT``,
``[NOT] IN (...)``, ``[NOT] BETWEEN``, ``IS [NOT] NULL``, ``IS [NOT] TRUE/FALSE``,
``[NOT] LIKE``/``ILIKE``, ``+ - * / %``, ``lower``, ``upper``, ``length``, ``coalesce``, casts
(``'2024-01-01'::timestamptz``, ``CAST(x AS int)``), positional parameters (``$1`` from
``params[1]``), and boolean columns on their own. Literals take the type of the column they are
compared with, as PostgreSQL types an unknown literal; logic is SQL's three-valued one (a row
matches only when the ``where`` is true, not null). Anything else is a `WhereError` with one
line naming it. Values are compiled by `changefeed.serve.sync.where_values`, conditions here.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from decimal import InvalidOperation
from typing import Any

import sqlglot
from sqlglot import exp

from changefeed.serve.sync.values import TableInfo
from changefeed.serve.sync.where_values import (
    Getter,
    Row,
    Typed,
    ValueCompiler,
    WhereError,
    describe,
    text_of,
)


class _Compiler(ValueCompiler):
    """The conditions of a ``where``: logic, comparisons, IN, BETWEEN, IS, LIKE."""

    # logic
    def _and(self, node: exp.And) -> Typed:
        left, right = self.condition(node.this), self.condition(node.expression)

        def both(row: Row) -> bool | None:
            a = left(row)
            if a is False:
                return False
            b = right(row)
            if b is False:
                return False
            return None if a is None or b is None else True
        return Typed(both, "bool")

    def _or(self, node: exp.Or) -> Typed:
        left, right = self.condition(node.this), self.condition(node.expression)

        def either(row: Row) -> bool | None:
            a = left(row)
            if a is True:
                return True
            b = right(row)
            if b is True:
                return True
            return None if a is None or b is None else False
        return Typed(either, "bool")

    def _not(self, node: exp.Not) -> Typed:
        inner = self.condition(node.this)

        def negate(row: Row) -> bool | None:
            value = inner(row)
            return None if value is None else not value
        return Typed(negate, "bool")

    def condition(self, node: exp.Expression) -> Getter:
        compiled = self.compile(node)
        if compiled.kind not in ("bool", None) or (compiled.kind is None and compiled.literal):
            if compiled.kind is None and compiled.literal is not None:
                value = self.literal_as(compiled, "bool")
                return lambda row: value
            raise WhereError(f"where: {node.sql('postgres')} is not a boolean")
        return compiled.get

    def _comparison(self, node: exp.Expression, compare: Callable[[Any, Any], bool]) -> Typed:
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
        return Typed(test, "bool")

    def _eq(self, node: exp.EQ) -> Typed:
        return self._comparison(node, operator.eq)

    def _neq(self, node: exp.NEQ) -> Typed:
        return self._comparison(node, operator.ne)

    def _lt(self, node: exp.LT) -> Typed:
        return self._comparison(node, operator.lt)

    def _lte(self, node: exp.LTE) -> Typed:
        return self._comparison(node, operator.le)

    def _gt(self, node: exp.GT) -> Typed:
        return self._comparison(node, operator.gt)

    def _gte(self, node: exp.GTE) -> Typed:
        return self._comparison(node, operator.ge)

    def _distinct(self, node: exp.Expression, distinct: bool) -> Typed:
        left, right = self.pair(self.compile(node.this), self.compile(node.expression),
                                node.sql("postgres"))

        def test(row: Row) -> bool:
            a, b = left(row), right(row)
            same = (a is None and b is None) or (a is not None and b is not None and a == b)
            return not same if distinct else same
        return Typed(test, "bool")

    def _nullsafeneq(self, node: exp.Expression) -> Typed:
        return self._distinct(node, True)

    def _nullsafeeq(self, node: exp.Expression) -> Typed:
        return self._distinct(node, False)

    def _in(self, node: exp.In) -> Typed:
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
        return Typed(test, "bool")

    def _between(self, node: exp.Between) -> Typed:
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
        return Typed(test, "bool")

    def _is(self, node: exp.Is) -> Typed:
        subject = self.compile(node.this)
        target = node.expression
        negate = bool(node.args.get("negate"))
        get = subject.get
        if isinstance(target, exp.Null):
            def test(row: Row) -> bool:
                return (get(row) is None) != negate
            return Typed(test, "bool")
        if isinstance(target, exp.Boolean):
            wanted = bool(target.this)

            def truth(row: Row) -> bool:
                return (get(row) is wanted) != negate
            return Typed(truth, "bool")
        raise WhereError(f"where: {node.sql('postgres')} is not supported")

    def _like(self, node: exp.Like, flags: int = 0) -> Typed:
        subject = self.compile(node.this)
        pattern = self.compile(node.expression)
        escape = node.args.get("escape")
        escape_char = "\\"
        if escape is not None:
            escape_char = str(self.compile(escape).get({}))
        if pattern.literal is None and pattern.kind is None:
            return Typed(lambda row: None, "bool")
        if pattern.literal is None:
            raise WhereError("where: LIKE takes a literal pattern")
        regex = re.compile(_like_regex(pattern.literal, escape_char), flags | re.DOTALL)
        get = subject.get

        def test(row: Row) -> bool | None:
            value = get(row)
            if value is None:
                return None
            return regex.fullmatch(text_of(value)) is not None
        return Typed(test, "bool")

    def _ilike(self, node: exp.ILike) -> Typed:
        return self._like(node, re.IGNORECASE)

    def _escape(self, node: exp.Escape) -> Typed:
        like = node.this
        like.set("escape", node.expression)
        return self.compile(like)


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
        raise WhereError(f"where: {describe(tree)} is not an expression")
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


__all__ = ["WhereError", "compile_where"]
