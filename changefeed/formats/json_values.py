"""JSON text read exactly, whatever its depth: numbers digit for digit, nothing that can stop a
feed.

Every JSON text changefeed reads goes through here: json and jsonb column values
(`loads_value`, via `changefeed.backends.postgres.values.JsonLoader`), the content of
logical decoding messages (`changefeed.message`), and the Kafka records and Redis entries a
feed reads back (`loads_document`, via `changefeed.formats.records`). Three things make the
difference with a plain ``json.loads``:

* **Numbers are exact.** Integers are ints (`JsonInt` beyond 64 bits, which orjson cannot
  encode; `JsonDecimal` beyond Python's 4300-digit limit, and for ``-0``); other numbers are
  `JsonDecimal`, written back digit for digit.
* **Depth is bounded.** orjson encodes at most 254 nested containers and Python's parsers
  recurse; PostgreSQL stores json nested 14,500 levels deep (more when built by functions).
  No Python value made here nests deeper than `MAX_DEPTH` containers: a value nested deeper is
  kept as its exact text, a `RawJson`, which the encoder writes verbatim (valid JSON, not a
  string). A column value or a message is kept whole that way; a record read back keeps only
  its parts below `MAX_DEPTH` as text. Depth is measured first, cheaply (counting brackets
  bounds it; only texts with more brackets than `MAX_DEPTH` are measured exactly, without
  recursion), so the common case costs two ``bytes.count`` calls.
* **Strings stay encodable.** ``json`` (not jsonb) accepts escaped lone surrogates
  (``"\\ud800"``), which Python can hold but UTF-8 cannot: such a value is kept as its text too.

Nothing here recurses with the depth of the input.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson

MAX_DEPTH = 200
"""The most containers a Python value made from JSON nests; deeper ones stay `RawJson`.
Far below orjson's 254 (so that rows, records, batches and webhook bodies around a value
still encode) and below Python's recursion limit."""


# -- value types -------------------------------------------------------------------------------


class JsonInt(int):
    """An integer inside a json value beyond 64 bits (orjson cannot encode those). JSON: the
    number, digit for digit.

    These raw-JSON types give their JSON text by ``__json_raw__`` (what
    `changefeed.formats.codec` writes verbatim) and, for other encoders, ``__json__`` (the
    same text as an ``orjson.Fragment``)."""

    def __json_raw__(self) -> str:
        return int.__repr__(self)

    def __json__(self) -> orjson.Fragment:
        return orjson.Fragment(int.__repr__(self))


class JsonDecimal(Decimal):
    """A non-integral number inside a json value, exact (also ``-0``, and integers of more
    digits than Python's ``int`` reads). JSON: the number (not a string, which is how
    `numeric` values go out)."""

    __slots__ = ()

    def __json_raw__(self) -> str:
        return Decimal.__str__(self)

    def __json__(self) -> orjson.Fragment:
        return orjson.Fragment(Decimal.__str__(self))


class RawJson(str):
    """A JSON value kept as its exact text: nested deeper than `MAX_DEPTH`, holding a number
    Python cannot hold, or a string UTF-8 cannot (an escaped lone surrogate). ``type`` says
    what it was (``json`` or ``jsonb`` for a column value). JSON: the text itself, verbatim
    (it is valid JSON), not a string."""

    type: str

    def __new__(cls, text: str, type: str = "json") -> RawJson:
        self = super().__new__(cls, text)
        self.type = type
        return self

    def __repr__(self) -> str:
        return f"RawJson({str(self)!r}, type={self.type!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (str(self), self.type))

    def __json_raw__(self) -> str:
        # Line breaks outside strings are only whitespace (inside strings they are escaped):
        # one JSON line must stay one line.
        return str(self).replace("\n", " ").replace("\r", " ")

    def __json__(self) -> orjson.Fragment:
        return orjson.Fragment(self.__json_raw__())


# -- numbers -----------------------------------------------------------------------------------


def json_int(text: str) -> int | Decimal:
    """A JSON integer's value: an int, `JsonInt` beyond 64 bits, `JsonDecimal` for ``-0`` and
    beyond Python's digit limit for ints."""
    try:
        value = int(text)
    except ValueError:  # more than 4300 digits
        return JsonDecimal(text)
    if -(2**63) <= value < 2**64:
        if value or text[0] != "-":
            return value
        return JsonDecimal(text)  # -0: its sign is part of the text
    return JsonInt(value)


def _float_or_decimal(text: str) -> float | Decimal:
    """A float when its shortest text has the same digits as ``text`` (so reading it as one
    loses nothing), else `JsonDecimal`: for records read back, where float columns must stay
    floats."""
    value = float(text)
    if repr(value) == text or orjson.dumps(value) == text.encode():
        return value
    return JsonDecimal(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads takes NaN and Infinity; JSON does not


_VALUE_DECODER = json.JSONDecoder(parse_float=JsonDecimal, parse_int=json_int,
                                  parse_constant=_no_constant)
_RECORD_DECODER = json.JSONDecoder(parse_float=_float_or_decimal, parse_int=json_int,
                                   parse_constant=_no_constant)


# -- depth and strings, measured without recursion ---------------------------------------------

_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_STRINGS = re.compile(_STRING, re.DOTALL)
_TOKENS = re.compile(_STRING + rb"|[\[\]{}]", re.DOTALL)
_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
# An escaped surrogate, preceded by an even run of backslashes (so it is an escape).
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD]([89a-fA-F])[0-9a-fA-F]{2}")
_SPACE = b" \t\r\n"


def deeper_than(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``data`` nests more than ``limit`` containers (for text that is
    not JSON, the answer means nothing)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case: fewer brackets than the limit, strings included
    skeleton = _STRINGS.sub(b"", data).translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    for _ in range(limit):  # each pass takes the innermost level of every container away
        if not skeleton:
            return False
        skeleton = skeleton.replace(b"[]", b"")
    return bool(skeleton)


def lone_surrogate(data: bytes) -> bool:
    """Whether the JSON text ``data`` escapes a lone surrogate (a high one not followed by a
    low one, or a low one not after a high one): json decodes it into a Python string that
    UTF-8, hence orjson, cannot encode."""
    if b"\\u" not in data:
        return False
    high_ends = -1  # where the last high surrogate escape ended
    for match in _SURROGATE_ESCAPE.finditer(data):
        start = match.end() - 6
        if match.group(1) in b"89abAB":  # high
            if high_ends >= 0:
                return True  # a high one not followed by a low one
            high_ends = match.end()
        elif high_ends == start:
            high_ends = -1  # a pair
        else:
            return True  # a low one alone
    return high_ends >= 0


def _raw_parts(data: bytes, limit: int) -> list[list[Any]]:
    """The parts of ``data`` to keep as text, as a tree of ``[start, end, children]``.

    A part is a container opened inside ``limit`` others (then, inside it, those opened
    ``limit`` deeper again, and so on: so that each part, its children left out, nests at most
    ``limit + 1`` levels and json.loads can check it), a string value holding a lone
    surrogate, or the object whose key holds one. Raises ValueError for unbalanced brackets.
    """
    root: list[Any] = [0, len(data), []]
    parts = [root]  # the part each open container belongs to, innermost last
    opened: list[tuple[int, int]] = []  # (offset, depth inside its part) of open containers
    for token in _TOKENS.finditer(data):
        start, end = token.span()
        first = data[start]
        if first == 34:  # a string
            if not lone_surrogate(token.group()):
                continue
            after = end
            while after < len(data) and data[after] in _SPACE:
                after += 1
            if after < len(data) and data[after] == 58:  # ':' a key: its object goes whole
                if not opened:
                    raise ValueError("a key outside any object")
                _keep_open_container_whole(parts, opened)
            else:
                parts[-1][2].append([start, end, []])
            continue
        if first in b"[{":
            depth = opened[-1][1] + 1 if opened else 0  # containers around it in its part
            if depth >= limit:
                part: list[Any] = [start, None, []]
                parts[-1][2].append(part)
                parts.append(part)
                depth = 0
            opened.append((start, depth))
            continue
        if not opened:
            raise ValueError("a closing bracket without an opening one")
        offset, _ = opened.pop()
        if parts[-1] is not root and parts[-1][0] == offset:
            parts.pop()[1] = end
    if opened:
        raise ValueError("a container that does not close")
    return root[2]


def _keep_open_container_whole(parts: list[list[Any]], opened: list[tuple[int, int]]) -> None:
    """Make the innermost open container a part of its own (if it is not one already),
    taking over the parts already found inside it."""
    offset = opened[-1][0]
    current = parts[-1]
    if current is not parts[0] and current[0] == offset:
        return
    inner = [child for child in current[2] if child[0] > offset]
    current[2] = [child for child in current[2] if child[0] < offset]
    part = [offset, None, inner]
    current[2].append(part)
    parts.append(part)
    opened[-1] = (offset, 0)


def _with_parts_replaced(data: bytes, start: int, end: int, children: list[list[Any]],
                         replace: Callable[[int], bytes]) -> bytes:
    pieces = []
    last = start
    for index, (child_start, child_end, _) in enumerate(children):
        pieces.append(data[last:child_start])
        pieces.append(replace(index))
        last = child_end
    pieces.append(data[last:end])
    return b"".join(pieces)


def _check(data: bytes, parts: list[list[Any]], decoder: json.JSONDecoder) -> None:
    """Raise ValueError unless every part is valid JSON (each parsed once, its own parts
    replaced by ``null``: the whole text is checked without any deep parse)."""
    stack = list(parts)
    while stack:
        start, end, children = stack.pop()
        piece = _with_parts_replaced(data, start, end, children, lambda _: b"null")
        decoder.decode(piece.decode())
        stack.extend(children)


# -- reading -----------------------------------------------------------------------------------


def loads_value(data: bytes, type: str = "json", *, trusted: bool = False) -> Any:
    """The value of one JSON text, exact; a `RawJson` of the whole text when it nests deeper
    than `MAX_DEPTH` or holds a string UTF-8 cannot hold (see the module docstring).

    Raises ValueError when ``data`` is not JSON (UTF-8). ``trusted``: the text is known to be
    JSON (PostgreSQL checked it), so a deep one is not checked again.
    """
    if deeper_than(data) or lone_surrogate(data):
        if not trusted:
            _check(data, [[0, len(data), _raw_parts(data, MAX_DEPTH)]], _VALUE_DECODER)
        return RawJson(data.decode(), type)
    try:
        return _VALUE_DECODER.decode(data.decode())
    except RecursionError:  # not reached: the depth is bounded; never let it stop a feed
        return RawJson(data.decode(), type)


def loads_document(data: bytes) -> Any:
    """A JSON document changefeed wrote (a Kafka record, a Redis entry), read back exactly.

    Numbers keep their digits (floats stay floats when that loses nothing, else `JsonDecimal`;
    big integers `JsonInt`), containers nested deeper than `MAX_DEPTH` and strings UTF-8
    cannot hold stay their text (`RawJson`), so a feed reading it back neither stops nor
    changes a value. The common case (written by orjson, nothing unusual) is read by orjson.
    Raises ValueError when ``data`` is not JSON.
    """
    if not deeper_than(data):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # big numbers, lone surrogates: the exact parser decides
        else:
            if orjson.dumps(value) == data:  # written back the same: nothing was lost
                return value
    return _load_parts(bytes(data), _RECORD_DECODER)


def loads_text(data: bytes) -> Any:
    """A JSON text another program wrote (PostgreSQL's jsonb output, say), read as
    `loads_document` reads one: digits kept, deep parts as `RawJson`; without its orjson
    attempt, which cannot succeed on text with spaces. Raises ValueError when it is not JSON."""
    return _load_parts(bytes(data), _RECORD_DECODER)


def _load_parts(data: bytes, decoder: json.JSONDecoder) -> Any:
    """``data`` parsed with ``decoder``, its raw parts (`_raw_parts`) as `RawJson`."""
    if not deeper_than(data) and not lone_surrogate(data):
        return decoder.decode(data.decode())  # the common case, and its error messages
    parts = _raw_parts(data, MAX_DEPTH)
    if not parts:
        return decoder.decode(data.decode())
    _check(data, parts, decoder)
    tag = f"\0changefeed-raw-{os.urandom(8).hex()}-"
    texts = {tag + str(index): RawJson(data[start:end].decode())
             for index, (start, end, _) in enumerate(parts)}
    text = _with_parts_replaced(data, 0, len(data), parts,
                                lambda index: f'"\\u0000{tag[1:]}{index}"'.encode())
    return _substitute(decoder.decode(text.decode()), texts)


def _substitute(value: Any, texts: dict[str, RawJson]) -> Any:
    """``value`` with each placeholder string of ``texts`` replaced by its text (in place)."""
    if value.__class__ is str:
        return texts.get(value, value)
    stack = [value]
    while stack:
        container = stack.pop()
        pairs = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in list(pairs):
            if item.__class__ is str:
                if item in texts:
                    container[key] = texts[item]
            elif isinstance(item, (dict, list)):
                stack.append(item)
    return value


__all__ = [
    "MAX_DEPTH", "JsonDecimal", "JsonInt", "RawJson", "deeper_than", "json_int",
    "loads_document", "loads_text", "loads_value", "lone_surrogate",
]
