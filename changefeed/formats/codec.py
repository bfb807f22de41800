"""The JSON encoding of the whole project: how a database value is written, everywhere.

Every line, record value, webhook body and stream entry changefeed writes goes through
`dumps` or `dumps_line` (orjson): datetimes in ISO 8601, UUIDs as strings, Decimals as strings
(a JSON number would lose digits in most consumers), bytes as base64, sets as lists, ranges as
``{"lower": .., "upper": .., "bounds": "[)"}`` (``{"empty": true}``), inet as PostgreSQL writes
it (``::ffff:1.2.3.4/64``, not Python's ``::ffff:102:304/64``); a value whose class has a
``__json_raw__`` method is written as the JSON text that returns (verbatim), one with a
``__json__`` method as the value that returns (the PostgreSQL value types of
`changefeed.backends.postgres.values` and `changefeed.formats.json_values` use it: exact json
numbers, json kept as text, NaN/Infinity, intervals, texts Python cannot hold). The README's
"Values" section has the table.

No value can make encoding fail for its depth: orjson stops at 254 nested containers, so a
value nested deeper (which changefeed's own sources never make, but a stage may) is encoded in
pieces, each at most `FRAGMENT_DEPTH` deep, giving the same JSON. Raw JSON texts longer than
`FRAGMENT_LIMIT` are put in place after encoding, around a bug of orjson's.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from ipaddress import IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

import orjson

from changefeed.change import UNCHANGED


def json_default(value: Any) -> Any:
    """orjson's ``default`` hook: the JSON form of a value orjson does not encode itself."""
    cls = value.__class__
    if cls is Decimal:  # the common case first
        return str(value)
    raw = getattr(cls, "__json_raw__", None)
    if raw is not None:
        return orjson.Fragment(raw(value))
    encode = getattr(cls, "__json__", None)
    if encode is not None:
        return encode(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if value is UNCHANGED:
        return None  # only reached inside nested values; rows drop such columns first
    # psycopg's ranges, looked up only where psycopg is loaded: without it there are none, and
    # importing a driver here would slow every command's start.
    ranges = sys.modules.get("psycopg.types.range")
    if ranges is not None and isinstance(value, ranges.Range):
        if value.isempty:
            return {"empty": True}
        return {"lower": value.lower, "upper": value.upper, "bounds": value.bounds}
    multiranges = sys.modules.get("psycopg.types.multirange")
    if multiranges is not None and isinstance(value, multiranges.Multirange):
        return list(value)
    if isinstance(value, (IPv4Interface, IPv6Interface, IPv6Address, IPv6Network, IPv4Network)):
        return inet_text(value)
    if hasattr(value, "isoformat"):  # time, timedelta-free date types orjson does not know
        return value.isoformat()
    # psycopg ranges, ipaddress objects and other values with a faithful text form
    return str(value)


def inet_text(value: Any) -> str:
    """An ``ipaddress`` address, interface or network as PostgreSQL writes inet and cidr: a
    host address without its full-length prefix (inet), a network always with its prefix
    (cidr), IPv6 in PostgreSQL's form, IPv4-mapped and IPv4-compatible addresses ending in a
    dotted quad (``::ffff:1.2.3.4``, ``::1.2.3.4``)."""
    if isinstance(value, (IPv4Network, IPv6Network)):
        address, prefix, network = value.network_address, value.prefixlen, True
    elif isinstance(value, (IPv4Interface, IPv6Interface)):
        address, prefix, network = value.ip, value.network.prefixlen, False
    else:
        address, prefix, network = value, value.max_prefixlen, False
    if address.version == 4:
        text = str(address)
    else:
        text = _ipv6_text(int(address))
        scope = getattr(address, "scope_id", None)
        if scope:
            text += f"%{scope}"
    if network or prefix != address.max_prefixlen:
        text += f"/{prefix}"
    return text


def _ipv6_text(number: int) -> str:
    """PostgreSQL's text of an IPv6 address (its ``inet_net_ntop``): the first longest run of
    two or more zero groups as ``::``; the last 32 bits as a dotted quad after six zero groups
    (IPv4-compatible) or after five and ``ffff`` (IPv4-mapped)."""
    groups = [(number >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best_start, best_length, start = -1, 0, -1
    for i, group in enumerate([*groups, 1]):  # a sentinel closes a run at the end
        if group == 0:
            if start < 0:
                start = i
        elif start >= 0:
            if i - start > best_length:
                best_start, best_length = start, i - start
            start = -1
    if best_length < 2:
        best_start, best_length = -1, 0
    dotted = best_start == 0 and (best_length == 6 or (best_length == 5 and groups[5] == 0xFFFF))
    head = groups[:6] if dotted else groups
    parts = [format(group, "x") for group in head]
    if best_start >= 0:
        before = ":".join(parts[:best_start])
        after = ":".join(parts[best_start + best_length:])
        text = f"{before}::{after}"
    else:
        text = ":".join(parts)
    if dotted:
        quad = ".".join(str(number >> shift & 0xFF) for shift in (24, 16, 8, 0))
        text += quad if text.endswith(":") else ":" + quad
    return text


ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS
"""The orjson options of `dumps`, for an encoder that calls orjson itself (the delta lines)."""
_LINE = ORJSON_OPTIONS | orjson.OPT_APPEND_NEWLINE
# Keys that are not strings (an int key in a stage's output) need OPT_NON_STR_KEYS, which
# makes every dict a third slower to encode: it is used only for values that need it.
_NON_STR_KEYS = orjson.OPT_NON_STR_KEYS


FRAGMENT_DEPTH = 128
"""A value orjson finds too deep is encoded in pieces of at most this many levels."""

FRAGMENT_LIMIT = 512
"""The longest raw JSON text handed to orjson as an ``orjson.Fragment``; longer ones are put
in place after encoding. (orjson 3.13 writes past its buffer when a Fragment of a few
kilobytes is followed by enough closing brackets and numbers: ``[[[big, 1], 1], ...]``, 24
levels deep, corrupts the heap. Fragments up to 1.5 kB were found safe at every offset.)"""


class _LongFragment(Exception):
    """Raised by `dumps_default` to send a value to the careful encoder."""


def dumps_default(value: Any) -> Any:
    """`json_default` for a fast ``orjson.dumps`` that can fail over to `dumps`: raises for a
    raw text longer than `FRAGMENT_LIMIT` (orjson then raises ``JSONEncodeError``)."""
    cls = value.__class__
    if cls is Decimal:
        return str(value)
    raw = getattr(cls, "__json_raw__", None)
    if raw is None:
        return json_default(value)
    text = raw(value)
    if len(text) > FRAGMENT_LIMIT:
        raise _LongFragment
    return orjson.Fragment(text)


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON bytes, with changefeed's encoding of database values."""
    try:
        return orjson.dumps(value, default=dumps_default, option=ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return _dumps_carefully(value, ORJSON_OPTIONS)


def dumps_line(value: Any) -> bytes:
    """`dumps` followed by a newline: one JSON line."""
    try:
        return orjson.dumps(value, default=dumps_default, option=_LINE)
    except orjson.JSONEncodeError:
        return _dumps_carefully(value, _LINE)


def _dumps_carefully(value: Any, option: int) -> bytes:
    """What the fast path refused: keys that are not strings, long raw texts, nesting past
    orjson's limit. Long raw texts and pieces of a deep value are written as placeholder
    strings, then put in place in the bytes."""
    option |= _NON_STR_KEYS
    texts: list[bytes] = []
    token = os.urandom(8).hex()

    def default(item: Any) -> Any:
        raw = getattr(item.__class__, "__json_raw__", None)
        if raw is None:
            return json_default(item)
        text = raw(item)
        if len(text) > FRAGMENT_LIMIT:
            return _placeholder(texts, token, text.encode())
        return orjson.Fragment(text)

    try:
        encoded = orjson.dumps(value, default=default, option=option)
    except orjson.JSONEncodeError as exc:
        if "recursion" not in str(exc).lower():
            raise
        piece_option = option & ~orjson.OPT_APPEND_NEWLINE
        pieces = _in_pieces(value, lambda piece: _placeholder(texts, token, _put_in_place(
            orjson.dumps(piece, default=default, option=piece_option), texts, token)))
        encoded = orjson.dumps(pieces, default=default, option=option)
    return _put_in_place(encoded, texts, token)


def _placeholder(texts: list[bytes], token: str, text: bytes) -> str:
    texts.append(text)
    return f"\0{token}:{len(texts) - 1}"


def _put_in_place(encoded: bytes, texts: list[bytes], token: str) -> bytes:
    """``encoded`` with each placeholder string of `_placeholder` replaced by its text."""
    if not texts:
        return encoded
    pattern = re.compile(rb'"\\u0000' + token.encode() + rb":(\d+)\"")
    return pattern.sub(lambda match: texts[int(match.group(1))], encoded)


def _in_pieces(value: Any, encode_piece: Callable[[Any], Any]) -> Any:
    """A copy of ``value`` in which each dict or list nested a multiple of `FRAGMENT_DEPTH`
    levels down is replaced by what ``encode_piece`` makes of it (its copy, itself already
    in pieces), innermost first, so that no encoding goes deeper than that. Iterative: the
    depth of ``value`` has no bound."""
    result: list[Any] = []
    stack: list[tuple[Any, Any, int, Any]] = []

    def start(item: Any, depth: int, put: Any) -> None:
        if isinstance(item, dict):
            stack.append((iter(item.items()), {}, depth, put))
        elif isinstance(item, (list, tuple)):
            stack.append((iter(item), [], depth, put))
        else:
            put(item)

    start(value, 0, result.append)
    while stack:
        items, copy, depth, put = stack[-1]
        try:
            item = next(items)
        except StopIteration:
            stack.pop()
            put(encode_piece(copy) if depth and depth % FRAGMENT_DEPTH == 0 else copy)
            continue
        if copy.__class__ is dict:
            start(item[1], depth + 1, partial(copy.__setitem__, item[0]))
        else:
            start(item, depth + 1, copy.append)
    return result[0]


__all__ = [
    "FRAGMENT_DEPTH", "FRAGMENT_LIMIT", "ORJSON_OPTIONS", "dumps", "dumps_default", "dumps_line",
    "inet_text", "json_default",
]
