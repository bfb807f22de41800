"""The JSON encoding of the whole project: how a database value is written, everywhere.

Every line, record value, webhook body and stream entry changefeed writes goes through
`dumps` or `dumps_line` (orjson): datetimes in ISO 8601, UUIDs as strings, Decimals as strings
(a JSON number would lose digits in most consumers), bytes as base64, sets as lists, ranges as
``{"lower": .., "upper": .., "bounds": "[)"}`` (``{"empty": true}``), inet as PostgreSQL writes
it; a value whose class has a ``__json__`` method is encoded as what that returns (the
PostgreSQL value types of `changefeed.backends.postgres.values` use it: exact json numbers,
NaN/Infinity, intervals, texts Python cannot hold). The README's "Values" section has the table.
"""

from __future__ import annotations

import base64
import sys
from decimal import Decimal
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

import orjson

from changefeed.change import UNCHANGED


def json_default(value: Any) -> Any:
    """orjson's ``default`` hook: the JSON form of a value orjson does not encode itself."""
    cls = value.__class__
    if cls is Decimal:  # the common case first
        return str(value)
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
    if isinstance(value, (IPv4Interface, IPv6Interface)):
        # As PostgreSQL writes inet: a host address without its full-length prefix.
        if value.network.prefixlen == value.max_prefixlen:
            return str(value.ip)
        return str(value)
    if hasattr(value, "isoformat"):  # time, timedelta-free date types orjson does not know
        return value.isoformat()
    # psycopg ranges, ipaddress objects and other values with a faithful text form
    return str(value)


ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS
"""The orjson options of `dumps`, for an encoder that calls orjson itself (the delta lines)."""
_LINE = ORJSON_OPTIONS | orjson.OPT_APPEND_NEWLINE
# Keys that are not strings (an int key in a stage's output) need OPT_NON_STR_KEYS, which
# makes every dict a third slower to encode: it is used only for values that need it.
_NON_STR_KEYS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON bytes, with changefeed's encoding of database values."""
    try:
        return orjson.dumps(value, default=json_default, option=ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return orjson.dumps(value, default=json_default, option=ORJSON_OPTIONS | _NON_STR_KEYS)


def dumps_line(value: Any) -> bytes:
    """`dumps` followed by a newline: one JSON line."""
    try:
        return orjson.dumps(value, default=json_default, option=_LINE)
    except orjson.JSONEncodeError:
        return orjson.dumps(value, default=json_default, option=_LINE | _NON_STR_KEYS)


__all__ = ["ORJSON_OPTIONS", "dumps", "dumps_line", "json_default"]
