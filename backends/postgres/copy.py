"""Back-fill chunks read through COPY: ``COPY (<chunk query>) TO STDOUT`` in text format.

A chunk's rows come as PostgreSQL's text of each value (the text the stream's pgoutput sends),
one row per COPY message, and are loaded by the stream's own loaders: the same values as
streamed rows. The compiled kernels (`changefeed._speedups`, ``copy.pxi``) split and load the
rows in C; the pure-Python code here does the same and stays the reference
(``tests/backends/test_copy_equivalence.py``).

COPY cannot stop after a number of bytes, so the chunk query's LIMIT comes from the chunk's
byte budget and the size of a row as last measured (`limit_for`); when rows turn out bigger
than measured, the read stops at the budget anyway (the COPY is cancelled). The size of a row
is its COPY text, measured for free as it is read.
"""

from __future__ import annotations

import contextlib
import re
import select
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg import pq, sql
from psycopg.errors import error_from_result

from changefeed._speedups import check, kernels
from changefeed.backends.postgres.loading import TypeLoaders, _row_reader, psycopg_loaders
from changefeed.backends.postgres.pgoutput import schema_version
from changefeed.errors import DecodeError

_NULL = b"\\N"
_TYPE = struct.Struct("!Ii")
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)
_LETTERS = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r",
            ord("t"): b"\t", ord("v"): b"\v"}
def _unescaped(match: re.Match[bytes]) -> bytes:
    octal, hexadecimal, other = match.groups()
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexadecimal is not None:
        return bytes((int(hexadecimal, 16),))
    return _LETTERS.get(other[0], other)


def copy_fields(line: bytes | memoryview) -> list[bytes | None]:
    """One row of COPY's text format -> each column's text (None for NULL): fields split at
    tabs, ``\\N`` a NULL, backslash escapes undone (``\\\\``, ``\\t``, ``\\n``, ``\\r``,
    ``\\b``, ``\\f``, ``\\v``, octal ``\\ooo``, hex ``\\xhh``, any other ``\\c`` is ``c``)."""
    data = bytes(line)
    if data.endswith(b"\n"):
        data = data[:-1]
    return [None if value == _NULL else (_ESCAPE.sub(_unescaped, value) if b"\\" in value
                                         else value)
            for value in data.split(b"\t")]


@dataclass(frozen=True)
class CopyShape:
    """The columns of a chunk's rows (what a compiled `RelationPlan` is made from, as from a
    pgoutput `Relation`), after ``leading`` fields of key text: the ctid of a table without
    key, or the key columns whose ``::text`` is not their COPY text (`cast_keys`)."""

    qualified_name: str
    columns: tuple[str, ...]
    type_oids: tuple[int, ...]
    key_indexes: tuple[int, ...]
    """The columns of a row's key (every column, for a table without key)."""
    key_fields: tuple[int, ...]
    """The field of a COPY row holding each key value's text (the ctid's, without key)."""
    leading: int = 0
    cast_keys: tuple[str, ...] = ()
    """The key columns selected first, as ``::text``."""
    watched: bool = True
    schema_version: str | None = None
    key_names: tuple[str, ...] = field(default=())
    source: str = ""
    """The relation read, as SQL (its current name)."""

    @property
    def by_ctid(self) -> bool:
        return not self.key_names


_COLUMNS = """
SELECT s.relation, a.attname, a.atttypid::oid::bigint, a.atttypmod, a.attgenerated <> '',
  t.typtype = 'd' OR EXISTS (SELECT FROM pg_cast c WHERE c.castsource = a.atttypid
    AND c.casttarget = 'text'::regtype AND c.castmethod = 'f')
FROM (SELECT %s::oid::regclass::text) AS s(relation)
LEFT JOIN pg_attribute a ON a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_type t ON t.oid = a.atttypid
ORDER BY a.attnum"""


def copy_shape(
    conn: psycopg.Connection, oid: int, name: str, key: Sequence[str], source: int | None = None
) -> CopyShape:
    """The shape of table ``oid``'s chunk rows: the columns pgoutput sends (not dropped, not
    generated, as `tables.stream_columns`), with the type OIDs pgoutput gives them, the table's
    `pgoutput.schema_version` now, and the name of the relation read (``source``, a partition,
    or the table). One round trip.

    A key value is read from its column's COPY text: its type's output function, as ``::text``
    is, except where a cast function makes ``::text`` (bool, char(n), inet, cidr, name; a
    domain, to be safe) or the column is not sent (generated): those key columns are selected
    first as ``::text``. The recorded text of a key is so that of ``::text``, as it was."""
    rows = conn.execute(_COLUMNS, [source or oid, oid]).fetchall()
    sent = [row for row in rows if row[1] is not None and not row[4]]
    columns = tuple(row[1] for row in sent)
    cast = {row[1] for row in rows if row[1] is not None and row[5]}
    cast_keys = tuple(column for column in key if column in cast or column not in columns)
    leading = len(cast_keys) if key else 1
    key_fields = tuple(cast_keys.index(column) if column in cast_keys
                       else leading + columns.index(column) for column in key) or (0,)
    # The key's columns among those sent; without key, the key is the whole row (`key_of`).
    indexes = (tuple(columns.index(column) for column in key if column in columns) if key
               else tuple(range(len(columns))))
    version = schema_version(list(columns), [_TYPE.pack(row[2], row[3]) for row in sent])
    return CopyShape(name, columns, tuple(row[2] for row in sent), indexes, key_fields,
                     leading, cast_keys, schema_version=version, key_names=tuple(key),
                     source=rows[0][0] if rows else str(source or oid))


class KeyReader:
    """The key of a COPY row as text (`line_key`): each key column's text (a list), or the
    ctid's of a table without key, decoded by the text loader as the ``text[]`` of the key
    and ``ctid::text`` were before the key was read from the row's own fields."""

    def __init__(self, shape: CopyShape, loaders: TypeLoaders) -> None:
        self.fields = shape.key_fields
        self.listed = not shape.by_ctid
        names = [str(i) for i in range(len(self.fields))]
        self.decode = _row_reader(names, [25] * len(names), loaders)

    def __call__(self, line: bytes | None) -> Any:
        if line is None:
            return None
        fields = copy_fields(line)
        texts = list(self.decode([fields[i] for i in self.fields]).values())
        return texts if self.listed else texts[0]


PROBE_ROWS = 1000
"""The LIMIT of a table's first chunk, before the size of its rows is known."""


def limit_for(rows: int, max_bytes: int, row_size: float) -> int:
    """The LIMIT of a chunk query: ``rows``, fewer when rows of ``row_size`` bytes would pass
    ``max_bytes`` (at least one row); at most `PROBE_ROWS` while ``row_size`` is not known."""
    if row_size <= 0:
        return max(1, min(rows, PROBE_ROWS))
    return max(1, min(rows, int(max_bytes / row_size)))


_SLOT = 8
"""A reference in a list or tuple."""
_ENTRY = 3 * 8 * 3 // 2
"""A dict entry (hash, key, value) with the table's spare room."""


def held_per_row(chunk: Any) -> float:
    """About the memory one row of ``chunk`` (a `CopiedChunk`) holds while its window is
    open: its dict and values (a few rows sampled), or for the direct path its JSON and
    spans; with its entry among the window's rows by key token and the token itself."""
    rows = chunk.rows
    count = len(rows)
    if not count:
        return 0.0
    # The window's index by key token, made if the stream changes a key inside it: an entry
    # (the row's index: a small int, shared) and the token (a tuple of values).
    index_cost = _ENTRY + _SLOT
    if chunk.lines:  # the direct path: JSON in one buffer
        token = rows.tokens(0, 1)[0]
        return rows.held_bytes() / count + index_cost + _deep_size(token)
    step = max(1, count // 8)
    sample = rows[::step]
    size = sum(_deep_size(row) for row in sample) / len(sample)
    return size + _SLOT + index_cost + 64  # the list of rows, a token's tuple of values


def _deep_size(value: Any) -> int:
    """The size of ``value`` and of the values it holds (one level of dict, list, tuple)."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(map(sys.getsizeof, value.values()))
    elif isinstance(value, (list, tuple)):
        size += sum(map(sys.getsizeof, value))
    return size


class CopiedChunk(NamedTuple):
    """A chunk read: its rows (dicts of the stream's columns; for the direct path, ``lines``,
    a compiled `CopiedLines`), whether the query had no more rows, the size of a row's COPY
    text as measured, the last row's key as text (`KeyReader`)."""

    rows: Any
    ended: bool
    row_size: float
    last_key: Any
    lines: bool = False

    @property
    def held_size(self) -> float:
        """About the memory a row holds in a window (`held_per_row`; 0 without rows)."""
        return held_per_row(self)


class CopyReader:
    """Reads back-fill chunks through COPY (see the module), rows loaded by the stream's own
    loaders: compiled where the extension is built, else in Python."""

    def __init__(self) -> None:
        self._loaders: TypeLoaders | None = None
        self._parsers: dict[CopyShape, Any] = {}

    def loaders(self, conn: psycopg.Connection) -> TypeLoaders:
        if self._loaders is None or self._loaders.catalog is not conn:
            self._loaders = psycopg_loaders(conn, catalog=conn)
            self._parsers.clear()
        return self._loaders

    def parser(self, conn: psycopg.Connection, shape: CopyShape) -> Any:
        """What splits and loads ``shape``'s rows: a compiled `CopyParser`, or `RowParser`."""
        loaders = self.loaders(conn)
        parser = self._parsers.get(shape)
        if parser is None:
            loaders.resolve([25, *shape.type_oids])
            parser = (kernels.CopyParser(shape, loaders) if kernels is not None
                      else RowParser(shape, loaders))
            if len(self._parsers) > 64:
                self._parsers.clear()
            self._parsers[shape] = parser
        return parser

    def __call__(
        self, conn: psycopg.Connection, query: sql.Composable, shape: CopyShape, *, limit: int,
        max_bytes: int, lines: bool = False, keys_json: bool = True,
    ) -> CopiedChunk:
        """The rows of ``query``, at most ``limit`` (its ``LIMIT``, or the COPY cut here),
        fewer once they hold about ``max_bytes`` of text. ``conn``: an autocommit connection,
        idle. ``lines``: as JSON for the direct path (compiled only:
        `CopyParser.read_lines`; the keys' JSON too if ``keys_json``)."""
        check()
        parser = self.parser(conn, shape)
        pgconn = conn.pgconn
        command = sql.SQL("COPY ({}) TO STDOUT").format(query).as_bytes(conn)
        pgconn.send_query(command)
        result = _result(pgconn)
        if result is None or result.status != pq.ExecStatus.COPY_OUT:
            _drain(pgconn)
            if result is None:
                raise psycopg.OperationalError(pgconn.get_error_message().decode(errors="replace"))
            raise error_from_result(result, encoding=conn.info.encoding)
        finished = False
        try:
            if lines:
                rows, last_key, nbytes, finished = parser.read_lines(
                    pgconn, limit, max_bytes, keys_json)
            else:
                rows, last_key, nbytes, finished = parser.read(pgconn, limit, max_bytes)
        finally:
            if not finished:  # cut at the budget, or an error: stop the COPY
                with contextlib.suppress(psycopg.Error):  # a connection lost: its error stands
                    conn.cancel_safe()
                while _copy_data(pgconn)[0] >= 0:
                    pass
        _finish(pgconn, conn)
        ended = finished and len(rows) < limit
        return CopiedChunk(rows, ended, max(1.0, nbytes / len(rows)) if len(rows) else 0.0,
                           parser.key(last_key), lines)


# Waiting for the server in select(), never inside libpq, which would hold the GIL: another
# thread of the process (one holding a lock the COPY waits for) must be able to go on.


def _wait(pgconn: Any) -> None:
    select.select([pgconn.socket], [], [])
    pgconn.consume_input()


def _result(pgconn: Any) -> Any:
    """The next result of the query sent (None: no more)."""
    while pgconn.is_busy():
        _wait(pgconn)
    return pgconn.get_result()


def _copy_data(pgconn: Any) -> tuple[int, Any]:
    """The next COPY row: (its size, its bytes); a size of -1 at the end, -2 for an error."""
    while True:
        size, data = pgconn.get_copy_data(1)
        if size:
            return size, data
        _wait(pgconn)


def _drain(pgconn: Any) -> None:
    while _result(pgconn) is not None:
        pass


def _finish(pgconn: Any, conn: psycopg.Connection) -> None:
    """Take the COPY's results: an error (not a cancel of ours) is raised."""
    error = None
    while (result := _result(pgconn)) is not None:
        if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = error_from_result(result, encoding=conn.info.encoding)
    if error is not None and not isinstance(error, psycopg.errors.QueryCanceled):
        raise error


class RowParser:
    """The pure-Python reader of COPY rows: `copy_fields` split, the values loaded as
    `PgOutputDecoder` loads a row's (the fast loader, the float guard, the rescue)."""

    def __init__(self, shape: CopyShape, loaders: TypeLoaders) -> None:
        self.shape = shape
        self.decode = _row_reader(list(shape.columns), list(shape.type_oids), loaders)
        self.key = KeyReader(shape, loaders)
        """The key (as text) of a row's line: `KeyReader`."""

    def rows(self, lines: Sequence[bytes]) -> tuple[list[dict[str, Any]], bytes | None]:
        """The rows of COPY lines, and the last line without its newline (its key: `key`)."""
        decode = self.decode
        leading = self.shape.leading
        width = len(self.shape.columns) + leading
        rows = []
        last = None
        for line in lines:
            fields = copy_fields(line)
            if len(fields) != width:
                raise DecodeError(f"{self.shape.qualified_name}: a COPY row of {len(fields)}"
                                  f" columns, not {width}")
            last = line
            rows.append(decode(fields[leading:] if leading else fields))
        if last is None:
            return rows, None
        last = bytes(last)
        return rows, last[:-1] if last.endswith(b"\n") else last

    def read(
        self, pgconn: Any, limit: int, max_bytes: int
    ) -> tuple[list[dict[str, Any]], bytes | None, int, bool]:
        """Read the COPY's lines (at most ``limit``, until they hold ``max_bytes``): (rows,
        the last line, the bytes read, whether the COPY ended)."""
        lines: list[bytes] = []
        nbytes = 0
        while True:
            if nbytes >= max_bytes and len(lines) < limit:
                rows, last = self.rows(lines)
                return rows, last, nbytes, False
            size, data = _copy_data(pgconn)
            if size < 0:
                if size == -2:
                    raise psycopg.OperationalError(
                        pgconn.get_error_message().decode(errors="replace"))
                rows, last = self.rows(lines)
                return rows, last, nbytes, True
            lines.append(bytes(data))
            nbytes += size
