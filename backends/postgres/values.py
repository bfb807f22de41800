"""What each PostgreSQL type becomes in Python and in JSON: the loaders behind the decoder.

Every value PostgreSQL stores must arrive exactly, or, where Python cannot hold it, as
PostgreSQL's own text in a recognisable form; no value may stop a feed. The README's "Values"
section is the table of what each type family becomes; this module is its implementation.

How it is built:

* psycopg's loaders do the work, chosen by type OID. For the few families where their Python
  value is not exact or not encodable, this module registers its own (json/jsonb with exact
  numbers, float with visible NaN/Infinity, interval with months and days kept apart, timetz,
  money), in an `AdaptersMap` of its own, so no global state changes.
* Types psycopg does not know by OID (domains, enums, composites, ranges and multiranges over
  any subtype, arrays of all of these) are looked up in the catalog once per OID, through a
  normal connection the caller supplies (``catalog=``: a connection, or a function opening one,
  called only when an unknown OID shows up), and registered with psycopg's own
  ``TypeInfo``/``CompositeInfo``/``RangeInfo``/``MultirangeInfo`` machinery.
* Fast path: one C ``load_sequence`` call per row. Values psycopg cannot turn into Python
  objects (dates out of 1..9999 or infinite, ``24:00`` times) make it raise; then `rescue`
  loads the row again with "tolerant" date and time loaders that keep such values as
  `PostgresText`, and finally, column by column, keeps any value that still fails as text.
  The cost falls only on rows that need it.

Value types here have a ``__json__`` method: the JSON encoder of `changefeed.pipelines.delta`
encodes them as what it returns (a plain value or an ``orjson.Fragment``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import time
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import psycopg
from psycopg import pq, sql
from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.rows import tuple_row
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.multirange import MultirangeInfo, register_multirange
from psycopg.types.range import RangeInfo, register_range
from psycopg.types.string import TextLoader

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


class RawJson(PostgresText):
    """A json/jsonb value Python cannot parse (a number of more than 4300 digits): its text,
    which goes out in JSON as itself, not as a string."""

    def __json__(self) -> Any:
        # Line breaks outside strings are only whitespace (inside strings they are escaped):
        # one JSON line must stay one line.
        return orjson.Fragment(str(self).replace("\n", " ").replace("\r", " "))


class NonFiniteFloat(float):
    """A float NaN, Infinity or -Infinity; JSON has no such numbers, and orjson would write
    them as ``null``, the same as NULL. JSON: ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""

    __slots__ = ()

    def __json__(self) -> str:
        if self != self:
            return "NaN"
        return "Infinity" if self > 0 else "-Infinity"


class JsonInt(int):
    """An integer inside a json value beyond 64 bits (orjson cannot encode those). JSON: the
    number, digit for digit."""

    def __json__(self) -> orjson.Fragment:
        return orjson.Fragment(int.__repr__(self))


class JsonDecimal(Decimal):
    """A non-integral number inside a json value, exact. JSON: the number (not a string, which
    is how `numeric` values go out)."""

    __slots__ = ()

    def __json__(self) -> orjson.Fragment:
        return orjson.Fragment(Decimal.__str__(self))


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


# -- loaders -----------------------------------------------------------------------------------


def _json_int(text: str) -> int:
    value = int(text)
    return value if -(2**63) <= value < 2**64 else JsonInt(value)


class _JsonLoader(Loader):
    """json and jsonb: ints unbounded, other numbers `JsonDecimal`; exact."""

    def load(self, data: Any) -> Any:
        try:
            return json.loads(bytes(data), parse_float=JsonDecimal, parse_int=_json_int)
        except ValueError:  # e.g. an integer beyond Python's 4300-digit limit
            return RawJson(bytes(data).decode(), "json" if self.oid == 114 else "jsonb")


class _FloatLoader(Loader):
    def load(self, data: Any) -> float:
        value = float(bytes(data))
        if value - value:  # NaN or infinite: finite values give 0.0
            return NonFiniteFloat(value)
        return value


_INTERVAL = re.compile(
    r"(?:([-+]?\d+) years? ?)?(?:([-+]?\d+) mons? ?)?(?:([-+]?\d+) days? ?)?"
    r"(?:([-+])?(\d+):(\d+):(\d+)(?:\.(\d+))?)?"
)


class _IntervalLoader(Loader):
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


class _TimetzLoader(Loader):
    def __init__(self, oid: int, context: Any = None):
        super().__init__(oid, context)
        self._base = _psycopg_loader(oid)(oid, context)

    def load(self, data: Any) -> TimeTZ:
        t = self._base.load(data)
        return TimeTZ(t.hour, t.minute, t.second, t.microsecond, t.tzinfo)


class _MoneyLoader(Loader):
    """money as Decimal; `SESSION_SETTINGS` sets ``lc_monetary`` to C: ``-$1,234.56``."""

    def load(self, data: Any) -> Decimal | PostgresText:
        text = bytes(data).decode()
        try:
            return Decimal(text.replace("$", "").replace(",", ""))
        except InvalidOperation:
            return PostgresText(text, "money")


_OWN_LOADERS: dict[int, type[Loader]] = {
    114: _JsonLoader, 3802: _JsonLoader, 700: _FloatLoader, 701: _FloatLoader,
    1186: _IntervalLoader, 1266: _TimetzLoader, 790: _MoneyLoader,
}

# Float columns of a row load fastest with psycopg's C loader, registered under these OIDs
# (in the range PostgreSQL keeps for development, never assigned to a type); floats inside
# arrays, composites and ranges use `_FloatLoader`, registered under the real OIDs.
_C_FLOAT = {700: 9998, 701: 9999}

# Types whose psycopg loaders raise on values PostgreSQL stores: in the tolerant adapters, such
# a value becomes PostgresText (element by element inside arrays, ranges and composites).
_FALLIBLE = {1082: "date", 1083: "time", 1114: "timestamp", 1184: "timestamptz", 1266: "timetz"}


def _psycopg_loader(oid: int) -> type[Loader]:
    loader = psycopg.adapters.get_loader(oid, TEXT)
    assert loader is not None, oid
    return loader


def _tolerant(base: type[Loader], type_name: str) -> type[Loader]:
    """``base``, returning PostgresText for any value it cannot load."""

    class Tolerant(Loader):
        def __init__(self, oid: int, context: Any = None):
            super().__init__(oid, context)
            self._load = base(oid, context).load

        def load(self, data: Any) -> Any:
            try:
                return self._load(data)
            except Exception:
                return PostgresText(bytes(data).decode(), type_name)

    Tolerant.__name__ = f"Tolerant{base.__name__}"
    return Tolerant


# -- the loader factory ------------------------------------------------------------------------

RowLoad = Callable[[Sequence[bytes | None]], Sequence[Any]]

_TYPE_QUERY = (
    "SELECT oid::regtype::text, typtype, typcategory, typelem, typbasetype"
    " FROM pg_type WHERE oid = %s"
)


class TypeLoaders:
    """A loader factory for `PgOutputDecoder`: type OIDs -> a function loading one row.

    ``context`` supplies psycopg's base adapters (a connection, or None for the defaults).
    ``catalog`` resolves types psycopg does not know: a non-replication connection, or a
    function returning a new one (closed after use; called only on a cache miss).
    """

    def __init__(self, context: Any = None, *, catalog: Any = None) -> None:
        base = context.adapters if context is not None else psycopg.adapters
        self.fast = AdaptersMap(base)
        self.tolerant = AdaptersMap(base)
        for oid, loader in _OWN_LOADERS.items():
            self.fast.register_loader(oid, loader)
            self.tolerant.register_loader(oid, loader)
        for oid, private in _C_FLOAT.items():
            self.fast.register_loader(private, _psycopg_loader(oid))
        for oid, name in _FALLIBLE.items():
            self.tolerant.register_loader(oid, _tolerant(self.tolerant.get_loader(oid, TEXT)
                                                         or TextLoader, name))
        self.catalog = catalog
        self.names: dict[int, str] = {}
        self._resolved: set[int] = set()

    def __call__(self, type_oids: Sequence[int]) -> RowLoad:
        self.resolve(type_oids)
        transformer = Transformer(self.fast)
        transformer.set_loader_types([_C_FLOAT.get(oid, oid) for oid in type_oids], TEXT)
        return transformer.load_sequence

    def rescue(self, type_oids: Sequence[int]) -> RowLoad:
        """The slow path, for a row the fast loader failed on: never raises."""
        oids = list(type_oids)
        tolerant = Transformer(self.tolerant)
        tolerant.set_loader_types(oids, TEXT)

        def load(raw: Sequence[bytes | None]) -> Sequence[Any]:
            try:
                return tolerant.load_sequence(raw)
            except Exception:
                return [self._load_one(oid, value) for oid, value in zip(oids, raw, strict=True)]

        # Top-level float columns load with psycopg's C loader, which makes NaN and Infinity
        # plain floats: the caller sends rows whose float text ends in a letter here instead.
        load.guarded = tuple(i for i, oid in enumerate(oids) if oid in _C_FLOAT)  # type: ignore
        return load

    def _load_one(self, oid: int, raw: bytes | None) -> Any:
        if raw is None:
            return None
        single = Transformer(self.tolerant)
        single.set_loader_types([oid], TEXT)
        try:
            return single.load_sequence([raw])[0]
        except Exception:
            return PostgresText(bytes(raw).decode(errors="replace"), self.type_name(oid))

    def type_name(self, oid: int) -> str:
        """PostgreSQL's name of type ``oid`` as far as known here (else the OID as text)."""
        info = self.fast.types.get(oid)
        return self.names.get(oid) or (info.regtype if info else str(oid))

    # -- catalog -------------------------------------------------------------------------------

    def resolve(self, type_oids: Sequence[int]) -> None:
        """Register loaders for those of ``type_oids`` psycopg does not know (once each)."""
        unknown = [oid for oid in type_oids if self._unknown(oid)]
        if not unknown or self.catalog is None:
            return
        owned = not isinstance(self.catalog, psycopg.Connection)
        conn = self.catalog() if owned else self.catalog
        try:
            for oid in unknown:
                self._resolve(conn, oid)
        finally:
            if owned:
                conn.close()

    def _unknown(self, oid: int) -> bool:
        return oid not in self._resolved and self.fast.get_loader(oid, TEXT) is None

    def _resolve(self, conn: psycopg.Connection[Any], oid: int) -> None:
        if not self._unknown(oid):
            return
        self._resolved.add(oid)
        with conn.cursor(row_factory=tuple_row) as cursor:
            row = cursor.execute(_TYPE_QUERY, [oid]).fetchone()
        if row is None:
            return  # loaded as text
        name, typtype, category, element, base = row
        self.names[oid] = name
        if category == "A" and element:
            self._resolve(conn, element)  # registering the element registers its array
            return
        if typtype == "c":
            info = CompositeInfo.fetch(conn, name)
            if info is None:
                return
            for field_oid in info.field_types:
                self._resolve(conn, field_oid)
            make = _composite_factory(list(info.field_names))
            for adapters in (self.fast, self.tolerant):
                register_composite(info, adapters, make)
        elif typtype == "r":
            info = RangeInfo.fetch(conn, name)
            if info is None:
                return
            self._resolve(conn, info.subtype_oid)
            for adapters in (self.fast, self.tolerant):
                register_range(info, adapters)
        elif typtype == "m":
            info = MultirangeInfo.fetch(conn, name)
            if info is None:
                return
            self._resolve(conn, info.range_oid)
            self._resolve(conn, info.subtype_oid)
            for adapters in (self.fast, self.tolerant):
                register_multirange(info, adapters)
        else:  # domains (as their base type), enums and unknown base types (as text)
            info = TypeInfo.fetch(conn, name)
            if info is None:
                return
            if typtype == "d":
                self._resolve(conn, base)
            for adapters in (self.fast, self.tolerant):
                loader = adapters.get_loader(base, TEXT) if typtype == "d" else None
                info.register(adapters)
                adapters.register_loader(oid, loader or TextLoader)


def _composite_factory(names: list[str]) -> Callable[..., dict[str, Any]]:
    def make(*values: Any) -> dict[str, Any]:
        return dict(zip(names, values, strict=True))

    return make


def psycopg_loaders(context: Any = None, *, catalog: Any = None) -> TypeLoaders:
    """The loader factory for `PgOutputDecoder` (see `TypeLoaders`)."""
    return TypeLoaders(context, catalog=catalog)


# -- reading rows with the same loaders --------------------------------------------------------


def read_rows(
    conn: psycopg.Connection[Any], query: Any, loaders: TypeLoaders, batch: int = 1000
) -> Any:
    """The rows of ``query`` as dicts, loaded exactly as the stream loads them (same loaders,
    same rescue), through a server-side cursor fetched ``batch`` rows at a time. ``conn`` must
    be in a transaction."""
    cursor_name = "changefeed_rows"
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("DECLARE {} NO SCROLL CURSOR FOR {}").format(
            sql.Identifier(cursor_name), query))
        fetch = sql.SQL("FETCH FORWARD {} FROM {}").format(
            sql.Literal(batch), sql.Identifier(cursor_name))
        load = rescue = names = guarded = None
        while True:
            cursor.execute(fetch)
            result = cursor.pgresult
            if result is None or result.ntuples == 0:
                break
            if load is None:
                oids = [result.ftype(i) for i in range(result.nfields)]
                names = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
                load, rescue = loaders(oids), loaders.rescue(oids)
                guarded = rescue.guarded  # type: ignore[attr-defined]
            width = result.nfields
            get = result.get_value
            for index in range(result.ntuples):
                raw = [get(index, column) for column in range(width)]
                try:
                    if any(raw[i] and raw[i][-1] > 57 for i in guarded):  # as the decoder does
                        raise LookupError
                    values = load(raw)
                except Exception:
                    values = rescue(raw)
                yield dict(zip(names, values, strict=True))
        cursor.execute(sql.SQL("CLOSE {}").format(sql.Identifier(cursor_name)))
