"""Back-fill chunks: a table's rows read in key chunks while the stream goes on (DBLog).

The pure parts: a table's progress, a chunk's window (opened at the stream position when the
chunk is selected, closed at its high watermark; a change inside it removes its key from the
chunk), and the snapshot changes of a closed window; a table without a key is read in ctid
ranges. `changefeed.backends.postgres.backfill` does the I/O. ARCHITECTURE.md ("Back-fill in
chunks") says why there is no low watermark."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from psycopg import sql

from changefeed._speedups import kernels
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.values import Interval
from changefeed.change import UNCHANGED, Change, Operation, SnapshotState, Truncate
from changefeed.formats.json_values import loads_value

WATERMARK_PREFIX = "changefeed.watermark"
"""The prefix of the high watermarks the feed writes through its slot."""
LINES_BATCH = 2048
"""A closed window's rows come out (direct path) in batches of lines of this many rows: the
batches written are freed as the next is made (`window_lines`)."""
RECENT_SECONDS = 1.0
"""Keys the stream gave this long before a chunk's SELECT are taken out of the chunk."""
BACKFILL_PREFIX = "changefeed.backfill"
"""`changefeed backfill` writes this message; the running feed of the named slot starts a
back-fill of the listed tables when it reads it."""
START_TID = "(0,0)"
"""Before the first row of a leaf (item numbers start at 1)."""
_TID = re.compile(r"\((\d+),(\d+)\)")


@dataclass(frozen=True)
class Moved:
    """`ChunkWindow.images`: a row an update gave a key that another row had inside the
    window: which of the two a chunk's row of that key is, is not known."""

    row: dict[str, Any]


def _over(before: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` (a row an update gave), its values left out (`UNCHANGED`) taken from
    ``before`` (the row as the stream gave it before, if it did) where it has them."""
    if before is None or UNCHANGED not in new.values():
        return new
    return {name: before.get(name, value) if value is UNCHANGED else value
            for name, value in new.items()}


def key_token(values: Sequence[Any]) -> Any:
    """A hashable token of key values, equal exactly when the values are: a stream change's
    key finds the chunk row it replaces. Lists, dicts and NaN (unequal to itself) included."""
    return tuple(_token(value) for value in values)


def _token(value: Any) -> Any:
    kind = value.__class__
    if kind is int or kind is str or kind is bytes or value is None or kind is bool:
        return value
    if kind is float:
        return ("float", value) if value == value else ("float", "NaN")
    if kind is Decimal and value.is_nan():
        return ("numeric", "NaN")
    if kind is list or kind is tuple:
        return ("list", tuple(_token(item) for item in value))
    if kind is dict:
        return ("dict", tuple((name, _token(item)) for name, item in value.items()))
    try:
        hash(value)
    except TypeError:
        return (kind.__name__, repr(value))
    return value


def parse_tid(text: str) -> tuple[int, int]:
    """``(page,item)`` -> (page, item)."""
    match = _TID.fullmatch(text)
    if match is None:
        raise ValueError(f"not a tid: {text!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass
class TableBackfill:
    """Where one table's back-fill stands (recorded on the publication after each chunk).

    ``oid`` is the watched table (its name, key and shape); ``source`` the relation read, the
    table itself or, for a partition attached with rows, that partition.
    """

    oid: int
    table: str
    key: list[str]
    """The key columns; empty: the key is the whole row, read by ctid."""
    key_types: list[str]
    after: list[str] | None = None
    """The last key done, as PostgreSQL text of each key column; read by ctid: the leaf's OID
    and the last ctid done. None: from the start."""
    done: int = 0
    chunks: int = 0
    estimate: int = 0
    started: float = field(default_factory=time.monotonic)
    announced: bool = False
    source: int = 0
    """The relation read (0: ``oid``)."""
    storage: int | None = None
    """Read by ctid: the relfilenode of the leaf being read (a new one: it was rewritten)."""
    markers: bool = True
    """Whether "started" and "done" frame it (not for a partition attached with rows)."""
    pages: int = 0
    """Read by ctid: pages per chunk, adapted to the rows found (0: not known yet)."""
    row_bytes: float = 0.0
    """The memory a row held in the last chunk read (0: not known yet), to size the next."""
    copy_share: float = 1.0
    """The share of that memory a row's COPY text was (to cut a chunk at its budget)."""
    reread: dict[Any, dict[str, Any]] = field(default_factory=dict)
    """Rows to read again by key (token -> key) before the chunk read last is recorded: the
    stream updated them with a TOASTed value left out (`changefeed.UNCHANGED`) where the
    consumer may not have the row yet (`ChunkWindow.complete_taken_rows`, `Backfills.observe`)."""
    complete_after_reread: bool = False
    """The chunk read last was the table's last: it is done once `reread` is."""

    def __post_init__(self) -> None:
        self.source = self.source or self.oid

    @property
    def by_ctid(self) -> bool:
        return not self.key

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"after": self.after, "done": self.done, "chunks": self.chunks}
        if self.storage is not None:
            state["storage"] = self.storage
        if self.source != self.oid:
            state["root"] = self.oid
        return state

    def key_of(self, row: dict[str, Any]) -> dict[str, Any]:
        """The key of ``row`` as its changes carry it (the whole row for a table without key)."""
        if not self.key:
            return dict(row)
        return {column: row.get(column) for column in self.key}

    def token(self, row: dict[str, Any]) -> Any:
        """`key_token` of ``row``'s key."""
        if not self.key:
            return key_token(tuple(row.values()))
        return key_token(tuple(row.get(column) for column in self.key))

    def chunk_query(
        self, identifier: sql.Composable, columns: Sequence[str], size: int,
        cast_keys: Sequence[str] = (),
    ) -> sql.Composed:
        """The next chunk's rows in key order (columns ``columns``), after the key columns
        ``cast_keys`` as ``::text`` (`copy.copy_shape` says which: the others' text is read
        from their own fields)."""
        keys = [sql.Identifier(column) for column in self.key]
        texts = [sql.SQL("t.{}::text AS {}").format(sql.Identifier(column),
                                                    sql.Identifier(f"__changefeed_key_{i}"))
                 for i, column in enumerate(cast_keys)]
        query = sql.SQL("SELECT {} FROM {} t").format(
            sql.SQL(", ").join([*texts, _select_list(columns)]), identifier
        )
        if self.after is not None:
            bound = sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(type_name))
                for value, type_name in zip(self.after, self.key_types, strict=True)
            )
            query += sql.SQL(" WHERE ({}) > ({})").format(sql.SQL(", ").join(keys), bound)
        order = sql.SQL(", ").join(keys)
        return query + sql.SQL(" ORDER BY {} LIMIT {}").format(order, sql.Literal(size))

    def keys_query(
        self, identifier: sql.Composable, columns: Sequence[str], keys: Sequence[dict[str, Any]],
        cast_keys: Sequence[str] = (),
    ) -> sql.Composed:
        """The rows of ``keys`` (as the stream gives keys: column -> value), as `chunk_query`
        gives a chunk's: each value a literal cast to its key column's type."""
        texts = [sql.SQL("t.{}::text AS {}").format(sql.Identifier(column),
                                                    sql.Identifier(f"__changefeed_key_{i}"))
                 for i, column in enumerate(cast_keys)]
        wanted = sql.SQL(", ").join(
            sql.SQL("({})").format(sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(_literal(key[column])), sql.SQL(type_name))
                for column, type_name in zip(self.key, self.key_types, strict=True)))
            for key in keys)
        return sql.SQL("SELECT {} FROM {} t WHERE ({}) IN ({})").format(
            sql.SQL(", ").join([*texts, _select_list(columns)]), identifier,
            sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(column))
                               for column in self.key),
            wanted)

    def ctid_query(
        self, leaf: sql.Composable, columns: Sequence[str], after: str, upper_page: int,
        size: int | None,
    ) -> sql.Composed:
        """The next chunk of a table without key: rows of ``leaf`` (only that relation) after
        ctid ``after`` and before page ``upper_page``, ctid first: the first ``size`` in ctid
        order, or (``size`` None) all of them as the scan finds them. PostgreSQL does not know
        that a TID range scan finds them in ctid order: ``ORDER BY`` makes it sort them
        (on disk past ``work_mem``), 2.7x the time of the scan alone."""
        query = sql.SQL(
            "SELECT t.ctid::text AS __changefeed_key, {} FROM ONLY {} t"
            " WHERE t.ctid > {}::tid AND t.ctid < {}::tid"
        ).format(_select_list(columns), leaf, sql.Literal(after),
                 sql.Literal(f"({upper_page},0)"))
        if size is None:
            return query
        return query + sql.SQL(" ORDER BY t.ctid LIMIT {}").format(sql.Literal(size))


def _literal(value: Any) -> Any:
    """A key value as psycopg can write it: our own value types as PostgreSQL reads them."""
    if value.__class__ is Interval:
        return value.isoformat()  # ISO 8601: PostgreSQL's interval input reads it exactly
    return value


def _select_list(columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in columns)


@dataclass(frozen=True)
class Leaf:
    """A relation with storage that a table without key is read from, by ctid."""

    oid: int
    name: sql.Composable
    storage: int
    """Its relfilenode."""
    pages: int
    """Its size in pages when the chunk was planned."""
    rows_per_page: float = 0.0
    """By the statistics (0: not known)."""


@dataclass(frozen=True)
class CtidChunk:
    """The next chunk of a table read by ctid: ``leaf``'s rows after ``after``, before page
    ``upper``; ``last`` if no leaf follows."""

    leaf: Leaf
    after: str
    upper: int
    last: bool


def next_ctid_chunk(
    backfill: TableBackfill, leaves: Sequence[Leaf], pages: int
) -> CtidChunk | None:
    """Where the next chunk of ``backfill`` (read by ctid) lies among ``leaves`` (in OID
    order), ``pages`` pages long; None when every leaf is read. Moves ``backfill.after`` on
    past leaves that are done or gone, and starts a leaf again whose storage was rewritten."""
    while True:
        if backfill.after is None:
            if not leaves:
                return None
            backfill.after = [str(leaves[0].oid), START_TID]
            backfill.storage = leaves[0].storage
        oid, after = int(backfill.after[0]), backfill.after[1]
        index = next((i for i, leaf in enumerate(leaves) if leaf.oid >= oid), len(leaves))
        if index == len(leaves):
            return None
        leaf = leaves[index]
        if leaf.oid != oid:  # detached or dropped meanwhile: on with the next one
            backfill.after, backfill.storage = [str(leaf.oid), START_TID], leaf.storage
            continue
        if backfill.storage not in (None, leaf.storage):  # rewritten: its rows moved
            backfill.after, backfill.storage = [str(leaf.oid), START_TID], leaf.storage
            continue
        backfill.storage = leaf.storage
        page = parse_tid(after)[0]
        if page >= leaf.pages:
            if index + 1 == len(leaves):
                return None
            following = leaves[index + 1]
            backfill.after, backfill.storage = [str(following.oid), START_TID], following.storage
            continue
        return CtidChunk(leaf, after, page + max(1, pages), index + 1 == len(leaves))


def pages_for(rows_per_page: float, chunk_size: int) -> int:
    """Pages that hold about ``chunk_size`` rows at ``rows_per_page`` (at least 1)."""
    if rows_per_page <= 0:
        return 1
    return max(1, min(1 << 20, math.ceil(chunk_size / rows_per_page)))


@dataclass
class ChunkWindow:
    """One chunk between its watermarks: its rows in the order read, minus the rows whose key
    the stream changed inside the window (`drop`)."""

    backfill: TableBackfill
    watermark: str
    rows: Any
    """The rows read: a list of row dicts, or for the direct path (``lines``) a compiled
    `CopiedLines` of their JSON."""
    last_key: list[str] | None
    complete: bool
    """The chunk was the table's last: the table is done after it."""
    storage: int | None = None
    """Read by ctid: the relfilenode of the leaf it was read from."""
    version: str | None = None
    """The table's schema version when the chunk was read (None: not known)."""
    lines: bool = False
    """Whether ``rows`` are the direct path's JSON (see `window_lines`)."""
    rereads: tuple[Any, ...] = ()
    """The tokens of the keys this chunk read again (`TableBackfill.reread`) instead of the
    next key range (empty: a key range); ``last_key`` is then the last range's, recorded
    with it."""
    images: dict[Any, Any] = field(default_factory=dict, init=False)
    """The row of each key the stream changed inside the window (or just before its read), as
    far as the stream gave it (`saw`): None where deleted, `Moved` where an update gave it a
    key another row had in the window."""
    dropped: set[int] = field(default_factory=set, init=False)
    """The indexes of the rows taken out."""
    cleared: bool = field(default=False, init=False)
    """A truncate inside the window: every row is taken out."""
    taken: dict[Any, Any] = field(default_factory=dict, init=False)
    """Token -> the index (a list where a token repeats) of each row taken out by `drop`."""
    _by_token: dict[Any, Any] | None = field(default=None, init=False, repr=False)

    def drop(self, token: Any) -> None:
        """The stream changed the key of ``token`` (None: a truncate, every key) inside the
        window: the rows of that key are stale (`taken`). The rows' index by token is made at
        the first change that comes (most windows see none)."""
        if token is None:
            self.cleared = True
            return
        if self.cleared:
            return
        by_token = self._by_token
        if by_token is None:
            by_token = self._by_token = self._indexed()
        found = by_token.pop(token, None)
        if found is None:
            return
        if found.__class__ is list:
            self.dropped.update(found)
        else:
            self.dropped.add(found)
        self.taken[token] = found

    def changed(self, tokens: list[Any], change: Change | Truncate) -> None:
        """The stream's ``change`` (of keys ``tokens``: its key, then its old key if it has
        one; None: a truncate) inside the window or just before its read: the rows of those
        keys are stale (`drop`), and the window notes what the stream gave (`saw`)."""
        for token in tokens:
            self.drop(token)
        if change.__class__ is Change and self.backfill.key:
            self.saw(change, tokens[0], tokens[1] if len(tokens) > 1 else None)

    def saw(self, change: Change, token: Any, old_token: Any = None) -> None:
        """The stream's ``change`` of key ``token`` (``old_token``: its key before, when an
        update changed it), inside the window or just before its read, in stream order: the
        row as the stream has given it so far (`images`). A value an update left out
        (`UNCHANGED`) is the one an earlier change in the window gave, if one did."""
        images = self.images
        operation = change.operation
        if operation is Operation.DELETE:
            images[token] = None
        elif operation is Operation.INSERT:
            images[token] = change.new
        elif old_token is not None and old_token != token:
            before = images.get(old_token)
            moved = before.__class__ is Moved
            row = _over(before.row if moved else before, change.new)
            # A chunk's row of the new key is this row, read after it moved, unless another
            # row had that key in the window.
            images[token] = Moved(row) if moved or token in images else row
            images[old_token] = None
        else:
            before = images.get(token)
            if before.__class__ is Moved:
                images[token] = Moved(_over(before.row, change.new))
            else:
                images[token] = _over(before, change.new)

    def complete_taken_rows(self) -> dict[Any, dict[str, Any]]:
        """Make whole, where the window can, the rows it took out for updates that left a
        TOASTed value out (`UNCHANGED`): the consumer never had such a row in full (this chunk
        was to bring it), and the stream does not send the value again until it changes.
        A value no change inside the window gave did not change while it was open, so the
        chunk's row, read inside it, has it: that row, with the stream's values over it,
        comes out. The keys of those it cannot make whole (a window of direct-path lines, a
        key the chunk read twice, a column the chunk did not have) are returned (token -> key)
        to be read again, as are rows moved to a key another row had in the window."""
        again: dict[Any, dict[str, Any]] = {}
        if self.cleared:
            return again
        images = self.images
        for token, index in self.taken.items():
            image = images.get(token)
            moved = image.__class__ is Moved
            if moved:
                image = image.row
            if image is None or UNCHANGED not in image.values():
                continue  # deleted, or whole in the stream
            read = self.rows[index] if not self.lines and index.__class__ is int else None
            if moved or read is None or any(value is UNCHANGED and name not in read
                                            for name, value in image.items()):
                again[token] = self.backfill.key_of(image)
                continue
            self.rows[index] = {name: read[name] if value is UNCHANGED else value
                                for name, value in image.items()}
            self.dropped.discard(index)
        return again

    def _indexed(self) -> dict[Any, Any]:
        """The rows' indexes by key token: an index, a list where a token repeats (rows
        without key, a key given by the user)."""
        rows = self.rows
        if self.lines:
            return rows.by_token()  # type: ignore[no-any-return]
        by_token: dict[Any, Any] = {}
        for index, token in enumerate(map(self.backfill.token, rows)):
            found = by_token.setdefault(token, index)
            if found is index:
                continue
            if found.__class__ is list:
                found.append(index)
            else:
                by_token[token] = [found, index]
        return by_token

    def kept(self) -> Sequence[int]:
        """The indexes of the rows not taken out, in the order read."""
        if self.cleared:
            return range(0)
        if not self.dropped:
            return range(len(self.rows))
        dropped = self.dropped
        return [index for index in range(len(self.rows)) if index not in dropped]

    @property
    def count(self) -> int:
        return 0 if self.cleared else len(self.rows) - len(self.dropped)


@dataclass
class FinishedChunk:
    """A chunk handed out; recorded once the slot is confirmed past ``end_lsn``."""

    backfill: TableBackfill
    last_key: list[str] | None
    count: int
    complete: bool
    storage: int | None = None
    end_lsn: int = 0
    last_position: PgPosition | None = None
    """The position of the chunk's last row handed out (None: no row)."""
    record: bool = True
    """Whether its acknowledgement is recorded: not for a chunk whose rows are read again
    after it (`ChunkWindow.reread`): the last read again records it, so that a feed cut short
    before reads the chunk again."""


def requested_tables(content: bytes, slot: str) -> list[int]:
    """The table OIDs a `BACKFILL_PREFIX` message asks ``slot``'s feed to back-fill
    (none when it is for another slot or not readable)."""
    try:
        request = loads_value(content)  # any message may carry the prefix: never recurse
    except ValueError:
        return []
    if not isinstance(request, dict) or request.get("slot") != slot:
        return []
    tables = request.get("tables")
    return [oid for oid in tables if type(oid) is int] if isinstance(tables, list) else []


def window_changes(
    window: ChunkWindow, table: str, version: str | None,
    next_position: Callable[[], PgPosition], *, markers: bool,
) -> tuple[list[Change | SnapshotState], PgPosition | None]:
    """A chunk whose high watermark arrived, as snapshot changes of ``table`` positioned in the
    watermark's transaction (``next_position``), with the table's start and end markers where
    they fall; and the position of the chunk's last row (None: it had none)."""
    backfill = window.backfill
    markers = markers and backfill.markers
    out: list[Change | SnapshotState] = []
    if markers and not backfill.announced:
        out.append(SnapshotState(table, "started", next_position()))
    backfill.announced = True
    every = window.rows
    rows = [every[index] for index in window.kept()]
    positions = [next_position() for _ in rows]
    if markers and window.complete:
        positions.append(next_position())
    key_of = backfill.key_of
    for row, position in zip(rows, positions, strict=False):
        out.append(Change(Operation.INSERT, table, row, None, key_of(row), position, None, None,
                          True, None, version))
    if markers and window.complete:
        out.append(SnapshotState(table, "done", positions[-1]))
    return out, positions[-1] if positions else None


def window_lines(
    window: ChunkWindow, table: str, version: str | None,
    next_position: Callable[[], PgPosition], *, markers: bool, fmt: str, model: Any = None,
    batch: int = LINES_BATCH,
) -> tuple[Iterator[Any], PgPosition | None]:
    """`window_changes` for the direct path (a window read as ``lines``): the chunk's rows as
    batches of at most ``batch`` of their ``fmt`` lines (`changefeed._speedups.Lines`), the
    markers around them, at the same positions, with the same bytes as the encoders write of
    `window_changes`'s. The positions are taken at once; the batches are made as they are
    taken from the iterator, so a chunk's lines are never all in memory at once."""
    backfill = window.backfill
    markers = markers and backfill.markers
    started = None
    if markers and not backfill.announced:
        started = SnapshotState(table, "started", next_position())
    backfill.announced = True
    count = window.count
    first = last = None
    if count:
        first, last = kernels.take_positions(next_position, count)  # type: ignore
    done = None
    if markers and window.complete:
        last = next_position()
        done = SnapshotState(table, "done", last)
    return _window_items(window, started, first, done, table, version, fmt, model,
                         max(1, batch)), last


def _window_items(
    window: ChunkWindow, started: SnapshotState | None, first: PgPosition | None,
    done: SnapshotState | None, table: str, version: str | None, fmt: str, model: Any,
    batch: int,
) -> Iterator[Any]:
    if started is not None:
        yield started
    if first is not None:
        kept = window.kept()
        index = first.index
        for start in range(0, len(kept), batch):
            lines = window.rows.lines(kept[start:start + batch], fmt, model, table, version,
                                      first.lsn, index)
            index += lines.count
            yield lines
    if done is not None:
        yield done
