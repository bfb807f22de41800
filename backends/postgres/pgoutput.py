"""A pure decoder of PostgreSQL's ``pgoutput`` logical replication messages (protocol 1).

`PgOutputDecoder.decode()` takes the payload of one XLogData message and returns a `Change`
(insert, update, delete), a `Begin` or `Commit` marking a transaction's bounds, or None for
messages that carry no change (relation and type descriptions, origins, messages). No I/O
happens here: the stream loop in `changefeed.backends.postgres.feed` reads bytes, this module
turns them into values, and the tests feed it bytes recorded from a real server.

Values arrive as text and become Python values through psycopg's own loaders, chosen by type
OID (`psycopg.adapt.Transformer.load_sequence`, implemented in C by psycopg-binary): numeric ->
Decimal, json -> dict, arrays -> lists, timestamptz -> datetime, and so on. Types psycopg does
not know (enums, domains over unknown types) stay text.

Positions: several rows share a commit LSN, so a change's position is its transaction's commit
LSN plus its index among the transaction's row changes, formatted so that string order is
position order: ``"0000000001A2B3C8:00000003"``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from psycopg import pq
from psycopg.adapt import Transformer

from changefeed.change import ALL, UNCHANGED, Change, Operation

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_TRUNCATE = struct.Struct("!IB")


def make_position(lsn: int, index: int) -> str:
    """The position of the ``index``-th row change of the transaction committed at ``lsn``."""
    return f"{lsn:016X}:{index:08X}"


def parse_position(position: str) -> tuple[int, int]:
    """The (commit LSN, index) of a position made by `make_position`."""
    lsn, _, index = position.partition(":")
    return int(lsn, 16), int(index or "0", 16)


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL writes it: ``16/B374D848``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """An LSN from PostgreSQL's ``16/B374D848`` form."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def pg_timestamp(microseconds: int) -> datetime:
    """A PostgreSQL protocol timestamp (microseconds since 2000-01-01 UTC) as a datetime."""
    return PG_EPOCH + timedelta(microseconds=microseconds)


@dataclass(frozen=True, slots=True)
class Begin:
    """A transaction starts; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    committed_at: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """A transaction ends; acknowledging ``end_lsn`` tells the server it is delivered."""

    commit_lsn: int
    end_lsn: int
    committed_at: datetime


@dataclass(frozen=True, slots=True)
class Truncate:
    """TRUNCATE of the named tables (reported, not turned into deletes)."""

    tables: tuple[str, ...]
    cascade: bool
    restart_identity: bool


@dataclass(slots=True)
class Relation:
    """A table as pgoutput describes it before the first change of each session."""

    oid: int
    schema: str
    name: str
    replica_identity: str
    columns: tuple[str, ...]
    type_oids: tuple[int, ...]
    key_indexes: tuple[int, ...]
    load: Callable[[Sequence[bytes | None]], Sequence[Any]]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


LoaderFactory = Callable[[Sequence[int]], Callable[[Sequence[bytes | None]], Sequence[Any]]]


def psycopg_loaders(context: Any = None) -> LoaderFactory:
    """A loader factory using psycopg's adapters (those of ``context``, a connection, if given).

    For a list of type OIDs it returns a function loading one row of text values at once.
    """

    def factory(type_oids: Sequence[int]) -> Callable[[Sequence[bytes | None]], Sequence[Any]]:
        transformer = Transformer(context)
        transformer.set_loader_types(list(type_oids), pq.Format.TEXT)
        return transformer.load_sequence

    return factory


class DecodeError(ValueError):
    """The bytes are not a pgoutput message this decoder understands."""


class PgOutputDecoder:
    """Turns pgoutput messages into `Change`s, keeping the state the protocol needs.

    pgoutput describes each table once (a Relation message) and then refers to it by OID; it
    wraps row changes in Begin/Commit. The decoder remembers both. ``operation`` filters the
    changes returned (row changes outside it still count for positions, so positions do not
    depend on the filter); ``tables``, if given, limits changes to those qualified names.
    ``primary_keys`` maps qualified table names to their key columns: pgoutput flags the
    replica identity columns, which under REPLICA IDENTITY FULL are all of them.
    """

    def __init__(
        self,
        operation: int = ALL,
        *,
        loaders: LoaderFactory | None = None,
        tables: Sequence[str] | None = None,
        primary_keys: dict[str, Sequence[str]] | None = None,
    ) -> None:
        self.operation = Operation(operation)
        self.primary_keys = dict(primary_keys or {})
        self.loaders = loaders or psycopg_loaders()
        self.tables = frozenset(tables) if tables else None
        self.relations: dict[int, Relation] = {}
        self.type_names: dict[int, str] = {}
        self.transaction: Begin | None = None
        self._index = 0
        self._position_lsn = 0

    def decode(self, data: bytes | memoryview) -> Change | Begin | Commit | Truncate | None:
        """Decode one message; see the module docstring for what comes back."""
        if not isinstance(data, bytes):
            data = bytes(data)
        kind = data[0]
        if kind == 73:  # 'I'
            return self._insert(data)
        if kind == 85:  # 'U'
            return self._update(data)
        if kind == 68:  # 'D'
            return self._delete(data)
        if kind == 66:  # 'B'
            final_lsn, timestamp, xid = _BEGIN.unpack_from(data, 1)
            self.transaction = Begin(final_lsn, pg_timestamp(timestamp), xid)
            self._index = 0
            self._position_lsn = final_lsn
            return self.transaction
        if kind == 67:  # 'C'
            _flags, commit_lsn, end_lsn, timestamp = _COMMIT.unpack_from(data, 1)
            self.transaction = None
            return Commit(commit_lsn, end_lsn, pg_timestamp(timestamp))
        if kind == 82:  # 'R'
            self._relation(data)
            return None
        if kind == 89:  # 'Y'
            (oid,) = _UINT32.unpack_from(data, 1)
            schema, offset = _string(data, 5)
            name, _ = _string(data, offset)
            self.type_names[oid] = f"{schema}.{name}"
            return None
        if kind == 84:  # 'T'
            return self._truncate(data)
        if kind in (79, 77):  # 'O' origin, 'M' logical message: no row change
            return None
        raise DecodeError(f"unknown pgoutput message type {chr(kind)!r}")

    # -- messages ------------------------------------------------------------------------------

    def _relation(self, data: bytes) -> None:
        (oid,) = _UINT32.unpack_from(data, 1)
        schema, offset = _string(data, 5)
        name, offset = _string(data, offset)
        replica_identity = chr(data[offset])
        (ncolumns,) = _INT16.unpack_from(data, offset + 1)
        offset += 3
        columns, type_oids, keys = [], [], []
        for index in range(ncolumns):
            flags = data[offset]
            column, offset = _string(data, offset + 1)
            (type_oid,) = _UINT32.unpack_from(data, offset)
            offset += 8  # type OID and type modifier
            columns.append(column)
            type_oids.append(type_oid)
            if flags & 1:
                keys.append(index)
        schema = schema or "public"
        primary_key = self.primary_keys.get(f"{schema}.{name}")
        if primary_key and all(column in columns for column in primary_key):
            keys = [columns.index(column) for column in primary_key]
        self.relations[oid] = Relation(
            oid, schema, name, replica_identity, tuple(columns), tuple(type_oids),
            tuple(keys), self.loaders(type_oids),
        )

    def _insert(self, data: bytes) -> Change | None:
        relation, position = self._row_change(data)
        if not (self.operation & Operation.INSERT) or relation is None:
            return None
        new, _ = self._tuple(relation, data, 6)  # after OID and 'N'
        return self._change(Operation.INSERT, relation, new, None, position)

    def _update(self, data: bytes) -> Change | None:
        relation, position = self._row_change(data)
        if not (self.operation & Operation.UPDATE) or relation is None:
            return None
        offset = 5
        old = None
        marker = data[offset]
        if marker in (75, 79):  # 'K' key only, 'O' whole old row
            old, offset = self._tuple(relation, data, offset + 1)
            if marker == 75:
                old = _only(old, relation)
            marker = data[offset]
        if marker != 78:  # 'N'
            raise DecodeError(f"update without new tuple ({chr(marker)!r})")
        new, _ = self._tuple(relation, data, offset + 1)
        if old is not None and UNCHANGED in new.values():
            # Unchanged TOASTed values are absent from the new row; a full old row has them.
            for column, value in new.items():
                if value is UNCHANGED and column in old and old[column] is not UNCHANGED:
                    new[column] = old[column]
        if old is None:
            old = _only(new, relation)
        return self._change(Operation.UPDATE, relation, new, old, position)

    def _delete(self, data: bytes) -> Change | None:
        relation, position = self._row_change(data)
        if not (self.operation & Operation.DELETE) or relation is None:
            return None
        marker = data[5]
        old, _ = self._tuple(relation, data, 6)
        if marker == 75:  # 'K'
            old = _only(old, relation)
        return self._change(Operation.DELETE, relation, None, old, position)

    def _truncate(self, data: bytes) -> Truncate:
        count, options = _TRUNCATE.unpack_from(data, 1)
        oids = struct.unpack_from(f"!{count}I", data, 6)
        tables = tuple(
            self.relations[oid].qualified_name if oid in self.relations else str(oid)
            for oid in oids
        )
        return Truncate(tables, bool(options & 1), bool(options & 2))

    # -- helpers -------------------------------------------------------------------------------

    def _row_change(self, data: bytes) -> tuple[Relation | None, str]:
        """The relation of a row change (None if filtered out) and the change's position."""
        (oid,) = _UINT32.unpack_from(data, 1)
        index = self._index
        self._index = index + 1
        relation = self.relations.get(oid)
        if relation is None:
            raise DecodeError(f"row change for relation {oid} before its Relation message")
        if self.tables is not None and relation.qualified_name not in self.tables:
            return None, ""
        return relation, make_position(self._position_lsn, index)

    def _change(
        self,
        operation: Operation,
        relation: Relation,
        new: dict[str, Any] | None,
        old: dict[str, Any] | None,
        position: str,
    ) -> Change:
        row = new if new is not None else old
        assert row is not None
        columns = relation.columns
        key = {columns[i]: row.get(columns[i]) for i in relation.key_indexes}
        transaction = self.transaction
        return Change(
            operation,
            relation.qualified_name,
            new,
            old,
            key,
            position,
            transaction.committed_at if transaction else None,
            transaction.xid if transaction else None,
        )

    def _tuple(self, relation: Relation, data: bytes, offset: int) -> tuple[dict[str, Any], int]:
        """Decode TupleData at ``offset``: a row dict and the offset after it."""
        (ncolumns,) = _INT16.unpack_from(data, offset)
        offset += 2
        raw: list[bytes | None] = []
        append = raw.append
        unchanged: list[int] | None = None
        unpack_int32 = _INT32.unpack_from
        for index in range(ncolumns):
            kind = data[offset]
            if kind == 116:  # 't' text value
                (length,) = unpack_int32(data, offset + 1)
                start = offset + 5
                offset = start + length
                append(data[start:offset])
            elif kind == 110:  # 'n' NULL
                offset += 1
                append(None)
            elif kind == 117:  # 'u' unchanged TOASTed value, not sent
                offset += 1
                append(None)
                if unchanged is None:
                    unchanged = []
                unchanged.append(index)
            else:
                raise DecodeError(f"unknown tuple value kind {chr(kind)!r}")
        columns = relation.columns
        if ncolumns != len(columns):
            raise DecodeError(
                f"{relation.qualified_name}: tuple has {ncolumns} columns, relation {len(columns)}"
            )
        row = dict(zip(columns, relation.load(raw), strict=True))
        if unchanged:
            for index in unchanged:
                row[columns[index]] = UNCHANGED
        return row, offset


def _only(row: dict[str, Any], relation: Relation) -> dict[str, Any]:
    """The key columns of ``row``."""
    columns = relation.columns
    return {columns[i]: row[columns[i]] for i in relation.key_indexes}


def _string(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(0, offset)
    return data[offset:end].decode(), end + 1
