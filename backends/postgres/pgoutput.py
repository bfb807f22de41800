"""A pure decoder of PostgreSQL's ``pgoutput`` logical replication messages (protocol 1).

`PgOutputDecoder.decode()` takes the payload of one XLogData message and returns a `Change`, a
`Message` (when its prefix is wanted), a `Truncated` (a `changefeed.Truncate` per watched table
a TRUNCATE emptied), a `Begin` or `Commit`, or None for messages that carry no change. Values
become Python values through `changefeed.backends.postgres.loading`; positions are made here
(ARCHITECTURE.md, "Positions", says how messages and truncates are placed among changes)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import changefeed._speedups as _speedups
from changefeed.backends.postgres.loading import psycopg_loaders
from changefeed.backends.postgres.position import PgPosition, TransactionPositions
from changefeed.backends.postgres.protocol import pg_timestamp
from changefeed.backends.postgres.tuples import RowDecoder, RowLoad, row_decoder
from changefeed.change import ALL, UNCHANGED, Change, Operation, Truncate
from changefeed.errors import DecodeError
from changefeed.message import Message

__all__ = [
    "Begin", "Commit", "LoaderFactory", "PgOutputDecoder", "Relation", "Renamed", "Truncated",
    "schema_version",
]

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_TRUNCATE = struct.Struct("!IB")
_MESSAGE = struct.Struct("!BQ")  # flags, LSN
_unpack_oid = _UINT32.unpack_from
# Module constants: an enum class attribute costs a lookup through the metaclass per change.
_INSERT, _UPDATE, _DELETE = Operation.INSERT, Operation.UPDATE, Operation.DELETE


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
class Truncated:
    """A TRUNCATE statement: ``items`` holds a `changefeed.Truncate` for each watched table it
    emptied (none when the operation mask leaves truncates out); ``tables`` names every table
    of the message, wanted or not."""

    items: tuple[Truncate, ...]
    tables: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Renamed:
    """A watched table (``oid``) is described under another name than before (a rename, or a
    move to another schema): its changes carry ``new_name`` from here on."""

    oid: int
    old_name: str
    new_name: str


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
    load: RowLoad
    watched: bool = True
    rescue: RowLoad | None = None
    """Loads a row ``load`` failed on (a value Python cannot hold); None: the error stands."""
    qualified_name: str = ""
    key_names: tuple[str, ...] = ()
    decode_row: RowDecoder | None = None
    """TupleData at an offset -> (row dict, key dict, offset after it, unchanged column names
    or None)."""
    schema_version: str | None = None
    """The shape of the table (see `schema_version`), given to each of its changes."""

    def __post_init__(self) -> None:
        self.qualified_name = f"{self.schema}.{self.name}"
        self.key_names = tuple(self.columns[i] for i in self.key_indexes)
        self.decode_row = row_decoder(
            self.qualified_name, self.columns, self.key_names, self.load, self.rescue
        )

    def key_of(self, row: dict[str, Any]) -> dict[str, Any]:
        """The key columns of ``row`` (a dict of the same shape as the key)."""
        names = self.key_names
        if len(names) == 1:
            name = names[0]
            return {name: row[name]}
        return {name: row[name] for name in names}


LoaderFactory = Callable[[Sequence[int]], RowLoad]
"""Type OIDs -> a function loading one row of text values at once. A factory may also have a
``rescue(type_oids)`` method giving the loader of rows the first one failed on; that function's
``guarded`` attribute lists columns whose text, if it ends in a letter, sends the row to it
directly (see `changefeed.backends.postgres.values`)."""


def schema_version(columns: Sequence[str], types: Sequence[bytes]) -> str:
    """A short stable identifier of a table's shape: its column names, in order, with their
    type OIDs and modifiers (``types``: the 8 bytes pgoutput sends per column). Any ALTER
    TABLE that adds, drops, renames or retypes a column changes it; nothing else does."""
    digest = hashlib.blake2b(digest_size=6)
    for column, type_bytes in zip(columns, types, strict=True):
        digest.update(column.encode() + b"\0" + type_bytes)
    return digest.hexdigest()


class PgOutputDecoder:
    """Turns pgoutput messages into `Change`s, keeping the state the protocol needs.

    pgoutput describes each table once (a Relation message) and then refers to it by OID; it
    wraps row changes in Begin/Commit. The decoder remembers both. ``operation`` filters the
    changes returned (row changes outside it still count for positions, so positions do not
    depend on the filter). ``tables``, if given, limits changes to those tables: a mapping of
    relation OIDs to their names as last known (the feed's way: a renamed table keeps its OID,
    and `decode` then returns a `Renamed`), or qualified names. ``primary_keys`` maps OIDs or
    qualified names to key columns: pgoutput flags the replica identity columns, which under
    REPLICA IDENTITY FULL are all of them; a table with neither has the whole row as key.
    """

    def __init__(
        self,
        operation: int = ALL,
        *,
        loaders: LoaderFactory | None = None,
        tables: dict[int, str] | Sequence[str] | None = None,
        primary_keys: dict[Any, Sequence[str]] | None = None,
        messages: Sequence[str] = (),
    ) -> None:
        self.operation = Operation(operation)
        self.loaders = loaders or psycopg_loaders()
        self.table_names: dict[int, str] | None = dict(tables) if isinstance(tables, dict) else None
        self.tables = frozenset(tables) if tables and self.table_names is None else None
        self.primary_keys = dict(primary_keys or {})
        self.message_prefixes = tuple(messages)
        self.relations: dict[int, Relation] = {}
        # Plain booleans and strings: IntFlag arithmetic costs a microsecond a row.
        self._insert_wanted = bool(self.operation & Operation.INSERT)
        self._update_wanted = bool(self.operation & Operation.UPDATE)
        self._delete_wanted = bool(self.operation & Operation.DELETE)
        self._truncate_wanted = bool(self.operation & Operation.TRUNCATE)
        self._in_transaction = False
        self._positions = TransactionPositions()
        self._committed_at: datetime | None = None
        self._xid: int | None = None

    def decode(
        self, data: bytes | memoryview
    ) -> Change | Message | Begin | Commit | Truncated | Renamed | None:
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
            begin = Begin(final_lsn, pg_timestamp(timestamp), xid)
            self._in_transaction = True
            self._positions.begin(final_lsn)
            self._committed_at = begin.committed_at
            self._xid = xid
            return begin
        if kind == 67:  # 'C'
            _flags, commit_lsn, end_lsn, timestamp = _COMMIT.unpack_from(data, 1)
            self._in_transaction = False
            return Commit(commit_lsn, end_lsn, pg_timestamp(timestamp))
        if kind == 82:  # 'R'
            return self._relation(data)
        if kind == 89:  # 'Y' type: the loaders look types up by OID themselves
            return None
        if kind == 84:  # 'T'
            return self._truncate(data)
        if kind == 77:  # 'M'
            return self._message(data)
        if kind == 79:  # 'O' origin: no change
            return None
        raise DecodeError(f"unknown pgoutput message type {chr(kind)!r}")

    # -- messages ------------------------------------------------------------------------------

    def _relation(self, data: bytes) -> Renamed | None:
        (oid,) = _UINT32.unpack_from(data, 1)
        schema, offset = _string(data, 5)
        name, offset = _string(data, offset)
        replica_identity = chr(data[offset])
        (ncolumns,) = _INT16.unpack_from(data, offset + 1)
        offset += 3
        columns, type_oids, keys, shape = [], [], [], []
        for index in range(ncolumns):
            flags = data[offset]
            column, offset = _string(data, offset + 1)
            (type_oid,) = _UINT32.unpack_from(data, offset)
            shape.append(data[offset:offset + 8])  # type OID and type modifier
            offset += 8
            columns.append(column)
            type_oids.append(type_oid)
            if flags & 1:
                keys.append(index)
        schema = schema or "public"
        qualified_name = f"{schema}.{name}"
        primary_key = self.primary_keys.get(oid) or self.primary_keys.get(qualified_name)
        if primary_key and all(column in columns for column in primary_key):
            keys = [columns.index(column) for column in primary_key]
        elif not keys:  # no key and no replica identity (inserts only): the whole row is it
            keys = list(range(len(columns)))
        names = self.table_names
        if names is not None:
            watched = oid in names
        else:
            watched = self.tables is None or qualified_name in self.tables
        self.relations[oid] = Relation(
            oid, schema, name, replica_identity, tuple(columns), tuple(type_oids),
            tuple(keys), self.loaders(type_oids), watched=watched,
            rescue=self._rescue(type_oids),
            schema_version=schema_version(columns, shape),
        )
        if names is not None and watched and names[oid] != qualified_name:
            renamed = Renamed(oid, names[oid], qualified_name)
            names[oid] = qualified_name
            return renamed
        return None

    def _insert(self, data: bytes) -> Change | None:
        positions = self._positions
        if not self._insert_wanted:
            positions.count += 1  # positions count every row change, wanted or not
            return None
        relation = self.relations.get(_unpack_oid(data, 1)[0])
        if relation is None or not relation.watched:
            positions.count += 1
            return self._unwatched(relation, data)
        new, key, _, _ = relation.decode_row(data, 6)  # after OID and 'N'
        return Change(
            _INSERT, relation.qualified_name, new, None, key,
            positions.take(), self._committed_at, self._xid, False, None,
            relation.schema_version,
        )

    def _update(self, data: bytes) -> Change | None:
        positions = self._positions
        if not self._update_wanted:
            positions.count += 1  # positions count every row change, wanted or not
            return None
        relation = self.relations.get(_unpack_oid(data, 1)[0])
        if relation is None or not relation.watched:
            positions.count += 1
            return self._unwatched(relation, data)
        offset = 5
        old = None
        marker = data[offset]
        if marker in (75, 79):  # 'K' key only, 'O' whole old row
            old, old_key, offset, _ = relation.decode_row(data, offset + 1)
            if marker == 75:
                old = old_key
            marker = data[offset]
        if marker != 78:  # 'N'
            raise DecodeError(f"update without new tuple ({chr(marker)!r})")
        new, key, _, unchanged = relation.decode_row(data, offset + 1)
        if unchanged and old is not None:
            # Unchanged TOASTed values are absent from the new row; a full old row has them.
            for column in unchanged:
                value = old.get(column, UNCHANGED)
                if value is not UNCHANGED:
                    new[column] = value
            key = relation.key_of(new)
        return Change(
            _UPDATE, relation.qualified_name, new, key if old is None else old, key,
            positions.take(), self._committed_at, self._xid, False, None,
            relation.schema_version,
        )

    def _delete(self, data: bytes) -> Change | None:
        positions = self._positions
        if not self._delete_wanted:
            positions.count += 1  # positions count every row change, wanted or not
            return None
        relation = self.relations.get(_unpack_oid(data, 1)[0])
        if relation is None or not relation.watched:
            positions.count += 1
            return self._unwatched(relation, data)
        old, key, _, _ = relation.decode_row(data, 6)
        if data[5] == 75:  # 'K': only the key columns carry values
            old = key
        return Change(
            _DELETE, relation.qualified_name, None, old, key,
            positions.take(), self._committed_at, self._xid, False, None,
            relation.schema_version,
        )

    def _message(self, data: bytes) -> Message | None:
        """A logical decoding message: flags (1: transactional), LSN, prefix, content."""
        flags, lsn = _MESSAGE.unpack_from(data, 1)
        prefix, offset = _string(data, 10)
        transactional = bool(flags & 1)
        if transactional and self._in_transaction:
            position = self._positions.take()
            committed_at, xid = self._committed_at, self._xid
        else:  # see the module docstring
            position, committed_at, xid = PgPosition(lsn - 1, 0), None, None
        if not self.message_prefixes or not prefix.startswith(self.message_prefixes):
            return None
        (length,) = _INT32.unpack_from(data, offset)
        content = data[offset + 4:offset + 4 + length]
        return Message(prefix, content, position, transactional, committed_at, xid, lsn)

    def next_position(self) -> PgPosition:
        """The position of one more change in the current transaction (after those decoded)."""
        return self._positions.take()

    def line_decoder(
        self, fmt: str, model: Any = None, frames: Any = None,
        replay_after: PgPosition | None = None, where: list[Any] | None = None,
    ) -> Callable[[Any], Any] | None:
        """A `decode` that gives row changes as their output lines of format ``fmt`` (the
        compiled path's `Lines` batches, taking the row changes at hand from ``frames`` too,
        leaving out those at or before ``replay_after``, and without a line for a row that
        does not match the filter ``where``), or None where this decoder cannot write them:
        the pure-Python one never does (its changes go to the format's encoder)."""
        return None

    def _truncate(self, data: bytes) -> Truncated:
        return self.decode_truncate(data, self._positions.take, self._committed_at, self._xid)

    def decode_truncate(
        self, data: bytes, take_position: Callable[[], PgPosition], committed_at: datetime | None,
        transaction: Any,
    ) -> Truncated:
        """A Truncate message (relation OIDs, options: 1 CASCADE, 2 RESTART IDENTITY): each
        table named takes the next position from ``take_position`` (wanted or not, watched or
        not, so that positions do not depend on the mask), in the message's order. For a
        decoder keeping the transaction's state itself (the compiled one)."""
        count, options = _TRUNCATE.unpack_from(data, 1)
        oids = struct.unpack_from(f"!{count}I", data, 6)
        cascade, restart_identity = bool(options & 1), bool(options & 2)
        items, tables = [], []
        for oid in oids:
            position = take_position()
            relation = self.relations.get(oid)
            name = relation.qualified_name if relation is not None else str(oid)
            tables.append(name)
            if relation is not None and relation.watched and self._truncate_wanted:
                items.append(Truncate(name, position, committed_at, transaction, cascade,
                                      restart_identity))
        return Truncated(tuple(items), tuple(tables))

    # -- helpers -------------------------------------------------------------------------------

    def _rescue(self, type_oids: Sequence[int]) -> RowLoad | None:
        rescue = getattr(self.loaders, "rescue", None)
        return rescue(type_oids) if rescue is not None else None

    @staticmethod
    def _unwatched(relation: Relation | None, data: bytes) -> None:
        """A row change of a table not watched; an error if its relation was never described."""
        if relation is None:
            oid = _UINT32.unpack_from(data, 1)[0]
            raise DecodeError(f"row change for relation {oid} before its Relation message")
        return None


def _string(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(0, offset)
    return data[offset:end].decode(), end + 1


# The compiled kernel's decode where it is built (the class above stays the reference).
PgOutputDecoder = _speedups.decoder_class(PgOutputDecoder)  # type: ignore[misc]
