"""Snorky's filter syntax, compiled once into a predicate over a row.

A filter is a JSON list, so it can come from a URL, a CLI flag or a subscription request::

    ["==", "color", "blue"]                       color is "blue"
    ["<", "age", 21]                              also "<=", ">", ">="
    ["and", ["==", "service", "web"], [">=", "level", 3]]
    ["or", ["not", ["==", "service", "java"]], [">=", "level", 3]]
    ["==", "player.color", "blue"]                dotted names reach into nested dicts

Semantics follow Snorky's dealers: a comparison whose field is missing, or whose values cannot be
ordered (``"a" < 1``), is false; ``not`` negates that. Checking the filter's shape when it is
compiled, rather than while rows flow, turns a typo into a `ConfigurationError` at start-up
instead of a pipeline that silently drops everything.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from changefeed.errors import ConfigurationError

Filter = list[Any]
Predicate = Callable[[Mapping[str, Any]], bool]

MAX_DEPTH = 100
"""How deeply filters may nest (``and``/``or``/``not`` inside one another). Far beyond any
real filter, and far below Python's recursion limit: input from a command line, a URL or a
config file must never be able to exhaust the stack."""

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_MISSING = object()


def get_field(row: Mapping[str, Any], name: str) -> Any:
    """The value at dotted ``name`` in ``row``, or a private sentinel when any part is missing."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def compile_filter(filter: Filter, _depth: int = 1) -> Predicate:
    """Check ``filter`` and return a predicate telling whether a row matches it.

    Raises `ConfigurationError` naming the faulty part on an unknown operator, a wrong shape,
    or nesting deeper than `MAX_DEPTH`.
    """
    if _depth > MAX_DEPTH:
        raise ConfigurationError(f"a filter may nest at most {MAX_DEPTH} levels deep")
    if not isinstance(filter, (list, tuple)) or not filter:
        raise ConfigurationError(
            f"a filter is a non-empty list such as ['==', 'color', 'blue'], not {filter!r}"
        )
    op, *args = filter
    if isinstance(op, str) and op in _COMPARISONS:
        if len(args) != 2 or not isinstance(args[0], str) or not args[0]:
            raise ConfigurationError(
                f"{op!r} takes a field name and a value, as in [{op!r}, 'age', 21]: got {filter!r}"
            )
        return _comparison(_COMPARISONS[op], args[0], args[1])
    if op in ("and", "or"):
        if not args:
            raise ConfigurationError(f"{op!r} needs at least one filter: got {filter!r}")
        parts = tuple(compile_filter(arg, _depth + 1) for arg in args)
        combine = all if op == "and" else any
        return lambda row: combine(part(row) for part in parts)
    if op == "not":
        if len(args) != 1:
            raise ConfigurationError(f"'not' takes exactly one filter: got {filter!r}")
        inner = compile_filter(args[0], _depth + 1)
        return lambda row: not inner(row)
    valid = ", ".join([*_COMPARISONS, "and", "or", "not"])
    raise ConfigurationError(f"unknown filter operator {op!r}: use one of {valid}")


def _comparison(compare: Callable[[Any, Any], bool], field: str, value: Any) -> Predicate:
    def matches(row: Mapping[str, Any]) -> bool:
        found = get_field(row, field)
        if found is _MISSING:
            return False
        try:
            return bool(compare(found, value))
        except TypeError:  # e.g. "a" < 1: Snorky treats unorderable values as no match
            return False

    return matches


def filter_fields(filter: Filter) -> set[str]:
    """The dotted field names ``filter`` reads (``filter`` must be valid)."""
    op, *args = filter
    if isinstance(op, str) and op in _COMPARISONS:
        return {args[0]}
    fields: set[str] = set()
    for arg in args:
        fields |= filter_fields(arg)
    return fields
