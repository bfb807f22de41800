"""What each PostgreSQL type family becomes in Python and in JSON.

Every value PostgreSQL stores must arrive exactly, or, where Python cannot hold it, as
PostgreSQL's own text in a recognisable form (`PostgresText`, `RawJson`); no value may stop a
feed. The README's "Values" section is the table; this module holds the value types it names and
the psycopg loaders (by type OID) for the families where psycopg's own are not exact or not
encodable: json/jsonb with exact numbers at any depth (read by
`changefeed.formats.json_values`, where their value types live, since feeds reading a log back
use them too), float with visible NaN/Infinity, interval with months and days kept apart,
timetz, money. `changefeed.backends.postgres.loading` puts them to work.

The value types have a ``__json__`` method: the JSON encoder of `changefeed.formats.codec`
encodes them as what it returns (a plain value or an ``orjson.Fragment``), so sinks need no
knowledge of PostgreSQL.
"""

from __future__ import annotations

import re
from datetime import time
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import Loader

from changefeed.formats.json_values import JsonDecimal, JsonInt, RawJson, loads_value

__all__ = [
    "SESSION_SETTINGS", "FloatLoader", "Interval", "IntervalLoader", "JsonDecimal", "JsonInt",
    "JsonLoader", "MoneyLoader", "NonFiniteFloat", "PostgresText", "RawJson", "TimeTZ",
    "TimetzLoader",
]

TEXT = pq.Format.TEXT

SESSION_SETTINGS = (
    "SELECT set_config('TimeZone', 'UTC', false), set_config('DateStyle', 'ISO, MDY', false),"
    " set_config('IntervalStyle', 'postgres', false),"
    " set_config('extra_float_digits', '3', false), set_config('lc_monetary', 'C', false)"
)
"""Settings that fix the text form of values, for every session whose values we load: UTC
timestamps, ISO dates (what psycopg parses), intervals in the style `IntervalLoader` reads,
floats in their shortest exact form whatever the server's default, and money as ``$1,234.56``."""


# -- value types -------------------------------------------------------------------------------


class PostgresText(str):
    """A value Python cannot hold (``infinity``, a BC date, year 10000, ``24:00``), kept as
    PostgreSQL's text; ``type`` names its PostgreSQL type. JSON: the text as a string."""

    type: str

    def __new__(cls, text: str, type: str) -> PostgresText:
        self = super().__new__(cls, text)
        self.type = type
        return self

    def __repr__(self) -> str:
        return f"PostgresText({str(self)!r}, type={self.type!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (str(self), self.type))

    def __json__(self) -> Any:
        return str(self)


class NonFiniteFloat(float):
    """A float NaN, Infinity or -Infinity; JSON has no such numbers, and orjson would write
    them as ``null``, the same as NULL. JSON: ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""

    __slots__ = ()

    def __json__(self) -> str:
        if self != self:
            return "NaN"
        return "Infinity" if self > 0 else "-Infinity"


class TimeTZ(time):
    """A ``timetz``: a `datetime.time` with its UTC offset. JSON: ISO 8601, ``12:00:00+02:00``
    (orjson refuses times with an offset; this subclass reaches our encoder instead)."""

    __slots__ = ()

    def __json__(self) -> str:
        return self.isoformat()


class Interval:
    """A PostgreSQL interval, exact: months, days and microseconds are separate quantities (a
    month is not 30 days, a day is not 24 hours across a DST change), so they stay apart.
    JSON: ISO 8601 as PostgreSQL's ``IntervalStyle iso_8601`` writes it, e.g. ``P1Y2M3DT4H5M6S``.
    (Not a dataclass: orjson would encode that as an object without asking us.)
    """

    __slots__ = ("months", "days", "microseconds")

    def __init__(self, months: int = 0, days: int = 0, microseconds: int = 0) -> None:
        self.months = months
        self.days = days
        self.microseconds = microseconds

    def _parts(self) -> tuple[int, int, int]:
        return (self.months, self.days, self.microseconds)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Interval:
            return NotImplemented
        return self._parts() == other._parts()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._parts())

    def __repr__(self) -> str:
        return f"Interval(months={self.months}, days={self.days}, " \
            f"microseconds={self.microseconds})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Interval, self._parts())

    def isoformat(self) -> str:
        """ISO 8601, exactly as PostgreSQL writes it with ``IntervalStyle iso_8601``."""
        years, months = _tdiv(self.months, 12), _trem(self.months, 12)
        usecs = self.microseconds
        hours = _tdiv(usecs, 3_600_000_000)
        usecs -= hours * 3_600_000_000
        minutes = _tdiv(usecs, 60_000_000)
        usecs -= minutes * 60_000_000
        if not (years or months or self.days or hours or minutes or usecs):
            return "PT0S"
        text = "P" + "".join(f"{n}{unit}" for n, unit in
                             ((years, "Y"), (months, "M"), (self.days, "D")) if n)
        if hours or minutes or usecs:
            text += "T" + "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n)
            if usecs:
                seconds, fraction = divmod(abs(usecs), 1_000_000)
                sign = "-" if usecs < 0 else ""
                text += f"{sign}{seconds}" + (f".{fraction:06d}".rstrip("0") if fraction else "")
                text += "S"
        return text

    __str__ = isoformat

    def __json__(self) -> str:
        return self.isoformat()


def _tdiv(a: int, b: int) -> int:
    """Integer division truncating toward zero, as C (and PostgreSQL) does it."""
    q = abs(a) // b
    return q if a >= 0 else -q


def _trem(a: int, b: int) -> int:
    return a - _tdiv(a, b) * b


# -- loaders (text format) ---------------------------------------------------------------------


class JsonLoader(Loader):
    """json and jsonb, exact: ints unbounded, other numbers `JsonDecimal`; a value nested
    deeper than `changefeed.formats.json_values.MAX_DEPTH`, or escaping a lone surrogate
    (``json`` takes them), as its text, a `RawJson` (see `loads_value`)."""

    def load(self, data: Any) -> Any:
        return loads_value(bytes(data), "json" if self.oid == 114 else "jsonb", trusted=True)


class FloatLoader(Loader):
    """float4 and float8: `float`, or `NonFiniteFloat` for NaN and ±Infinity."""

    def load(self, data: Any) -> float:
        value = float(bytes(data))
        if value - value:  # NaN or infinite: finite values give 0.0
            return NonFiniteFloat(value)
        return value


_INTERVAL = re.compile(
    r"(?:([-+]?\d+) years? ?)?(?:([-+]?\d+) mons? ?)?(?:([-+]?\d+) days? ?)?"
    r"(?:([-+])?(\d+):(\d+):(\d+)(?:\.(\d+))?)?"
)


class IntervalLoader(Loader):
    """Reads ``IntervalStyle postgres`` (set by `SESSION_SETTINGS`): ``1 year 2 mons -3 days
    04:05:06.5``."""

    def load(self, data: Any) -> Interval | PostgresText:
        text = bytes(data).decode()
        match = _INTERVAL.fullmatch(text)
        if match is None:
            return PostgresText(text, "interval")
        years, months, days, sign, hours, minutes, seconds, fraction = match.groups()
        usecs = 0
        if hours is not None:
            usecs = ((int(hours) * 60 + int(minutes)) * 60 + int(seconds)) * 1_000_000
            usecs += int((fraction or "").ljust(6, "0")[:6] or 0)
            if sign == "-":
                usecs = -usecs
        return Interval(int(years or 0) * 12 + int(months or 0), int(days or 0), usecs)


class TimetzLoader(Loader):
    """timetz: psycopg's loader, its value as a `TimeTZ` (which our JSON encoder can write)."""

    def __init__(self, oid: int, context: Any = None):
        super().__init__(oid, context)
        base = psycopg.adapters.get_loader(oid, TEXT)
        assert base is not None
        self._base = base(oid, context)

    def load(self, data: Any) -> TimeTZ:
        t = self._base.load(data)
        return TimeTZ(t.hour, t.minute, t.second, t.microsecond, t.tzinfo)


class MoneyLoader(Loader):
    """money as Decimal; `SESSION_SETTINGS` sets ``lc_monetary`` to C: ``-$1,234.56``."""

    def load(self, data: Any) -> Decimal | PostgresText:
        text = bytes(data).decode()
        try:
            return Decimal(text.replace("$", "").replace(",", ""))
        except InvalidOperation:
            return PostgresText(text, "money")
