"""``--where`` and ``--filter``: row filters written on a command line, as Snorky filters.

``--where EXPR`` (`parse_where`) keeps changes whose row (the new row; the old one for a
delete) matches ``EXPR``: comparisons ``field OP value`` with OP one of ``== != < <= > >=``,
a value written as in JSON or Python (``"open"``, ``'open'``, ``3``, ``2.5``, ``true``,
``false``, ``null``), dotted fields for nested JSON, combined with ``and``, ``or``, ``not``
and parentheses: ``--where 'status == "open" and priority >= 2'``. It is read into a Snorky
filter (`changefeed.pipelines.filters`), so both options share one evaluator; `row_filter`
makes the stage.

``--filter JSON`` (`parse_filter`) takes a Snorky filter as JSON (``'["==", "color",
"blue"]'``), for the `subscription` stage: updates entering or leaving the filter become
inserts or deletes.

(Named for the expressions it reads: a module ``where`` would hide the `where` stage that
``changefeed.pipelines`` exports.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import changefeed._speedups as _speedups
from changefeed.change import Change
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.pipelines._steps import _Entry, _Segment
from changefeed.pipelines.filters import MAX_DEPTH, Filter, compile_filter
from changefeed.pipelines.stages import Where

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
      | (?P<op>==|!=|<=|>=|<|>)
      | (?P<paren>[()])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    )""",
    re.VERBOSE,
)
_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False,
              "None": None}


def parse_where(text: str) -> Filter:
    """Parse a ``--where`` expression into a Snorky filter.

    >>> parse_where('status == "open" and priority >= 2')
    ['and', ['==', 'status', 'open'], ['>=', 'priority', 2]]
    >>> parse_where("not (owner.name != 'ann')")
    ['not', ['not', ['==', 'owner.name', 'ann']]]

    Raises `ConfigurationError` pointing at the first thing it cannot read.
    """
    tokens: list[tuple[str, Any, int]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            column = len(text) - len(text[position:].lstrip())
            raise _where_error(text, column, "unexpected character")
        kind = match.lastgroup or ""
        raw = match.group(kind)
        start = match.start(kind)
        if kind == "string":
            value: Any = _string(raw, text, start)
        elif kind == "number":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        else:
            value = raw
        tokens.append((kind, value, start))
        position = match.end()
    parser = _WhereParser(text, tokens)
    result = parser.expression()
    if parser.index < len(tokens):
        raise _where_error(text, tokens[parser.index][2], "expected 'and', 'or' or the end")
    return result


def _string(raw: str, text: str, start: int) -> str:
    body = raw[1:-1]
    if raw[0] == "'":
        body = body.replace("\\'", "'").replace('"', '\\"')
    try:
        return str(json.loads(f'"{body}"'))
    except json.JSONDecodeError:
        raise _where_error(text, start, "bad string") from None


def _where_error(text: str, position: int, problem: str) -> ConfigurationError:
    return ConfigurationError(
        f"cannot read --where {text!r}: {problem} at column {position + 1}"
        f" (write comparisons like: status == \"open\" and priority >= 2)"
    )


class _WhereParser:
    """expression := conjunction ('or' conjunction)*; conjunction := term ('and' term)*;
    term := 'not' term | '(' expression ')' | field OP value."""

    def __init__(self, text: str, tokens: list[tuple[str, Any, int]]) -> None:
        self.text = text
        self.tokens = tokens
        self.index = 0
        self.depth = 0  # parentheses and 'not's open: bounded, so no input exhausts the stack

    def _peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _take(self, kind: str, value: Any = None) -> bool:
        token = self._peek()
        if token is not None and token[0] == kind and (value is None or token[1] == value):
            self.index += 1
            return True
        return False

    def _fail(self, problem: str) -> ConfigurationError:
        token = self._peek()
        return _where_error(self.text, token[2] if token else len(self.text), problem)

    def _deeper(self, parse: Any) -> Filter:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self._fail(f"nested more than {MAX_DEPTH} levels deep (parentheses and 'not')")
        result = parse()
        self.depth -= 1
        return result

    def expression(self) -> Filter:
        parts = [self.conjunction()]
        while self._take("word", "or"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else ["or", *parts]

    def conjunction(self) -> Filter:
        parts = [self.term()]
        while self._take("word", "and"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else ["and", *parts]

    def term(self) -> Filter:
        if self._take("word", "not"):
            return ["not", self._deeper(self.term)]
        if self._take("paren", "("):
            inner = self._deeper(self.expression)
            if not self._take("paren", ")"):
                raise self._fail("expected ')'")
            return inner
        token = self._peek()
        if token is None or token[0] != "word" or token[1] in ("and", "or", "not"):
            raise self._fail("expected a field name")
        field = token[1]
        self.index += 1
        op = self._peek()
        if op is None or op[0] != "op":
            raise self._fail("expected one of == != < <= > >=")
        self.index += 1
        value_token = self._peek()
        if value_token is None:
            raise self._fail("expected a value")
        kind, value, _ = value_token
        if kind == "word" and value in _CONSTANTS:
            value = _CONSTANTS[value]
        elif kind not in ("string", "number"):
            raise self._fail("expected a value: a quoted string, a number, true, false or null")
        self.index += 1
        if op[1] == "!=":
            return ["not", ["==", field, value]]
        return [op[1], field, value]


class RowWhere(Where):
    """The `where` stage `row_filter` makes: keeps changes whose row (new, or old for a delete)
    matches a Snorky ``filter``. A batch of changes is judged in one call (`each`), by the
    compiled evaluator where it is built (the same answers; it asks the predicate per change
    only for what it cannot be sure of), else by the predicate."""

    __slots__ = ("filter", "_batch")

    def __init__(self, filter: Filter) -> None:
        matches = compile_filter(filter)

        def row_matches(change: Change) -> bool:
            return matches(change.row or {})

        row_matches.__name__ = json.dumps(filter)
        super().__init__(row_matches)
        self.filter = filter
        self._batch: Any = None
        if _speedups.kernels is not None:
            self._batch = _speedups.kernels.RowFilter(filter, self)

    def __reduce__(self) -> tuple[type, tuple[Filter]]:
        return RowWhere, (self.filter,)  # the predicate is a closure

    def each(self, items: list[Any]) -> list[Any] | None:
        """Each of ``items`` if kept, else None, in one call (see `EncodeLines.each`)."""
        if self._batch is not None:
            return self._batch.each(items)  # type: ignore[no-any-return]
        return [self(item) for item in items]


def row_filter(filter: Filter) -> Where:
    """A `where` stage keeping changes whose row (new, or old for a delete) matches ``filter``."""
    return RowWhere(filter)


def row_keeper(filter: Filter) -> Callable[[Change], bool]:
    """What the `row_filter` stage of ``filter`` decides for a change, as a function: True to
    keep it. A failure raises the `PipelineError` a pipeline would. For ``changefeed run
    --where`` without a pipeline, on the changes its feed could not filter itself (see
    `ChangeFeed.prefer_lines`)."""
    segment = _Segment([row_filter(filter)], keep_change=False, dead_letter=None)

    def keep(change: Change) -> bool:
        entries, failure = segment.process([_Entry(change, False)])
        if failure is not None:
            raise PipelineError(failure.message) from failure.cause
        return bool(entries[0].items)

    return keep


def parse_filter(text: str) -> Filter:
    """Parse a ``--filter`` JSON Snorky filter, checking its shape."""
    try:
        filter = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"--filter is not JSON ({exc.msg}): write it like '[\"==\", \"color\", \"blue\"]'"
        ) from exc
    except RecursionError:  # the decoder stops itself cleanly at its depth limit
        raise ConfigurationError(
            f"--filter nests deeper than JSON can be read here (a filter may nest at most"
            f" {MAX_DEPTH} levels)"
        ) from None
    compile_filter(filter)
    return filter


__all__ = ["parse_filter", "parse_where", "row_filter", "row_keeper"]
