"""Loading rows: the loader factory behind `PgOutputDecoder` and the snapshot reader.

psycopg's loaders by type OID, ours (`changefeed.backends.postgres.values`) over them, types
found in the catalog once per OID; one C ``load_sequence`` call per row, and `rescue` for the
rows with values Python cannot hold (kept as text). `read_rows` gives snapshot rows the same
values. ARCHITECTURE.md ("Values") says why it is built this way."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.rows import tuple_row
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.multirange import MultirangeInfo, register_multirange
from psycopg.types.range import RangeInfo, register_range
from psycopg.types.string import TextLoader

from changefeed.backends.postgres.values import (
    TEXT,
    FloatLoader,
    IntervalLoader,
    JsonLoader,
    MoneyLoader,
    PostgresText,
    TimetzLoader,
)

_OWN_LOADERS: dict[int, type[Loader]] = {
    114: JsonLoader, 3802: JsonLoader, 700: FloatLoader, 701: FloatLoader,
    1186: IntervalLoader, 1266: TimetzLoader, 790: MoneyLoader,
}

# Float columns of a row load fastest with psycopg's C loader, registered under these OIDs
# (in the range PostgreSQL keeps for development, never assigned to a type); floats inside
# arrays, composites and ranges use `FloatLoader`, registered under the real OIDs.
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
    conn: psycopg.Connection[Any], query: sql.Composable, loaders: TypeLoaders, batch: int = 1000
) -> Iterator[dict[str, Any]]:
    """The rows of ``query`` as dicts, with exactly the values the stream gives them (see
    `load_result`), through a server-side cursor fetched ``batch`` rows at a time. ``conn``
    must be in a transaction."""
    name = sql.Identifier("changefeed_rows")
    fetch = sql.SQL("FETCH FORWARD {} FROM {}").format(sql.Literal(batch), name)
    with conn.cursor() as cursor:
        cursor.execute(sql.SQL("DECLARE {} NO SCROLL CURSOR FOR {}").format(name, query))
        while True:
            cursor.execute(fetch)
            result = cursor.pgresult
            if result is None or result.ntuples == 0:
                break
            yield from load_result(result, loaders)
        cursor.execute(sql.SQL("CLOSE {}").format(name))


def query_rows(
    conn: psycopg.Connection[Any], query: sql.Composable, loaders: TypeLoaders
) -> list[dict[str, Any]]:
    """The rows of ``query`` (one statement, all rows at once) as `load_result` loads them."""
    with conn.cursor() as cursor:
        cursor.execute(query)
        result = cursor.pgresult
        return load_result(result, loaders) if result is not None else []


def load_result(result: pq.abc.PGresult, loaders: TypeLoaders) -> list[dict[str, Any]]:
    """A query result's rows as dicts, with exactly the values streamed rows get.

    All rows are loaded at once by psycopg (in C) with the factory's adapters, where floats load
    through `FloatLoader` (NaN visible); if that raises, the rows go one by one through the
    decoder's own path (`_row_reader`: fast loader, float guard, rescue)."""
    width = result.nfields
    names = [(result.fname(i) or b"").decode() for i in range(width)]
    decode = _row_reader(names, [result.ftype(i) for i in range(width)], loaders)  # resolves
    transformer = Transformer(loaders.fast)
    transformer.set_pgresult(result)
    try:
        return transformer.load_rows(0, result.ntuples, _dict_maker(names))
    except Exception:
        get = result.get_value
        return [decode([get(index, column) for column in range(width)])
                for index in range(result.ntuples)]


def _dict_maker(names: list[str]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    def make(values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(names, values, strict=True))

    return make


def _row_reader(
    names: list[str], oids: list[int], loaders: TypeLoaders
) -> Callable[[list[bytes | None]], dict[str, Any]]:
    """Raw values -> the row dict, as `PgOutputDecoder`'s generated row decoder does it."""
    load, rescue = loaders(oids), loaders.rescue(oids)
    guarded: tuple[int, ...] = rescue.guarded  # type: ignore[attr-defined]

    def decode(raw: list[bytes | None]) -> dict[str, Any]:
        values: Sequence[Any]
        if any((value := raw[i]) and value[-1] > 57 for i in guarded):  # NaN, Infinity
            values = rescue(raw)
        else:
            try:
                values = load(raw)
            except Exception:
                values = rescue(raw)
        return dict(zip(names, values, strict=True))

    return decode
