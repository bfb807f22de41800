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
_KEY_TYPES = {"array": 1009, "ctid": 25}
"""The type of ``__changefeed_key``: the key values as text[] (`TableBackfill.chunk_query`),
or the ctid as text (`TableBackfill.ctid_query`)."""


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
    """The columns of a chunk's rows after ``__changefeed_key`` (what a compiled
    `RelationPlan` is made from, as from a pgoutput `Relation`)."""

    qualified_name: str
    columns: tuple[str, ...]
    type_oids: tuple[int, ...]
    key_indexes: tuple[int, ...]
    key_type: int
    watched: bool = True
    schema_version: str | None = None
    key_names: tuple[str, ...] = field(default=())
    source: str = ""
    """The relation read, as SQL (its current name)."""


def copy_shape(
    conn: psycopg.Connection, oid: int, name: str, key: Sequence[str], source: int | None = None
) -> CopyShape:
    """The shape of table ``oid``'s chunk rows: the columns pgoutput sends (not dropped, not
    generated, as `tables.stream_columns`), with the type OIDs pgoutput gives them, the table's
    `pgoutput.schema_version` now, and the name of the relation read (``source``, a partition,
    or the table). One round trip."""
    rows = conn.execute(
        "SELECT s.relation, a.attname, a.atttypid::oid::bigint, a.atttypmod"
        " FROM (SELECT %s::oid::regclass::text) AS s(relation) LEFT JOIN pg_attribute a"
        " ON a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''"
        " ORDER BY a.attnum", [source or oid, oid],
    ).fetchall()
    found = [row for row in rows if row[1] is not None]
    columns = tuple(row[1] for row in found)
    indexes = tuple(columns.index(column) for column in key if column in columns)
    version = schema_version(list(columns), [_TYPE.pack(row[2], row[3]) for row in found])
    return CopyShape(name, columns, tuple(row[2] for row in found), indexes,
                     _KEY_TYPES["array" if key else "ctid"], schema_version=version,
                     key_names=tuple(key), source=rows[0][0] if rows else str(source or oid))


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
    token_cost = _ENTRY + _SLOT
    if chunk.by_token is not None:  # the direct path: JSON in one buffer
        token = next(iter(chunk.by_token), None)
        if token is not None:
            token_cost += _deep_size(token)
        return (rows.held_bytes() + sys.getsizeof(chunk.by_token)) / count + token_cost
    step = max(1, count // 8)
    sample = rows[::step]
    size = sum(_deep_size(row) for row in sample) / len(sample)
    return size + 2 * _SLOT + token_cost + 64  # the list of rows, a token's tuple of values


def _deep_size(value: Any) -> int:
    """The size of ``value`` and of the values it holds (one level of dict, list, tuple)."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(map(sys.getsizeof, value.values()))
    elif isinstance(value, (list, tuple)):
        size += sum(map(sys.getsizeof, value))
    return size


class CopiedChunk(NamedTuple):
    """A chunk read: its rows (dicts of the stream's columns; for the direct path, a compiled
    `CopiedLines`), whether the query had no more rows, the size of a row's COPY text as
    measured, the last row's ``__changefeed_key``, and for the direct path the rows' indexes
    by key token."""

    rows: Any
    ended: bool
    row_size: float
    last_key: Any
    by_token: dict[Any, list[int]] | None = None

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
            loaders.resolve([shape.key_type, *shape.type_oids])
            parser = (kernels.CopyParser(shape, loaders) if kernels is not None
                      else RowParser(shape, loaders))
            if len(self._parsers) > 64:
                self._parsers.clear()
            self._parsers[shape] = parser
        return parser

    def __call__(
        self, conn: psycopg.Connection, query: sql.Composable, shape: CopyShape, *, limit: int,
        max_bytes: int, lines: bool = False,
    ) -> CopiedChunk:
        """The rows of ``query`` (which ends in ``LIMIT limit``), fewer once they hold about
        ``max_bytes`` of text. ``conn``: an autocommit connection, idle. ``lines``: as JSON
        for the direct path (compiled only, tables with a key: `CopyParser.read_lines`)."""
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
        by_token = None
        try:
            if lines:
                rows, by_token, last_key, nbytes, finished = parser.read_lines(
                    pgconn, limit, max_bytes)
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
                           parser.key(last_key), by_token)


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
        self.key_load = _row_reader(["key"], [shape.key_type], loaders)

    def rows(self, lines: Sequence[bytes]) -> tuple[list[dict[str, Any]], bytes | None]:
        """The rows of COPY lines, and the last one's raw ``__changefeed_key``."""
        decode = self.decode
        width = len(self.shape.columns) + 1
        rows = []
        key = None
        for line in lines:
            fields = copy_fields(line)
            if len(fields) != width:
                raise DecodeError(f"{self.shape.qualified_name}: a COPY row of {len(fields)}"
                                  f" columns, not {width}")
            key = fields[0]
            rows.append(decode(fields[1:]))
        return rows, key

    def read(
        self, pgconn: Any, limit: int, max_bytes: int
    ) -> tuple[list[dict[str, Any]], bytes | None, int, bool]:
        """Read the COPY's lines (at most ``limit``, until they hold ``max_bytes``): (rows,
        the last raw key, the bytes read, whether the COPY ended)."""
        lines: list[bytes] = []
        nbytes = 0
        while True:
            if nbytes >= max_bytes and len(lines) < limit:
                rows, key = self.rows(lines)
                return rows, key, nbytes, False
            size, data = _copy_data(pgconn)
            if size < 0:
                if size == -2:
                    raise psycopg.OperationalError(
                        pgconn.get_error_message().decode(errors="replace"))
                rows, key = self.rows(lines)
                return rows, key, nbytes, True
            lines.append(bytes(data))
            nbytes += size

    def key(self, raw: bytes | None) -> Any:
        """The loaded ``__changefeed_key`` (a list of texts, or a ctid's text)."""
        return None if raw is None else self.key_load([raw])["key"]
