"""The RethinkDB feed: ``table.changes()`` through the official ``rethinkdb`` driver.

Mapping of the documents a ``changes(include_types=True, include_states=True)`` cursor yields:

* ``{"type": "add", "new_val": row}``: INSERT, ``new`` = row;
* ``{"type": "change", "old_val": old, "new_val": row}``: UPDATE, ``old`` = the whole old row;
* ``{"type": "remove", "old_val": old}``: DELETE, ``old`` = the whole row, ``new`` None;
* ``{"type": "initial", "new_val": row}``: INSERT with ``snapshot=True`` (a read of the table);
* ``{"type": "uninitial", ...}``: skipped (only ordered ``limit`` feeds send it);
* ``{"state": "initializing" | "ready"}``: no change but a `State`; ``ready`` ends the read;
* ``{"error": "..."}``: raises `TransientBackendError` (the server dropped changes).

``table`` is ``"db.table"`` and ``key`` is ``{primary_key: value}``. Old values are complete:
RethinkDB sends the whole old document with every update and delete. Rows are the driver's
values (``datetime`` with the driver's fixed-offset tzinfo for times, ``bytes`` for binary).

What RethinkDB does not have, said plainly:

* **No commit timestamps.** ``committed_at`` is always None, and ``transaction`` too (RethinkDB
  has no multi-document transactions).
* **No resume.** A changefeed lives as long as its query: there is no log position to continue
  from after a reconnect or a restart, and changes made meanwhile are not kept anywhere.
  Instead the feed *re-syncs* (``resync=True``, the default): after a reconnect, and on a start
  whose checkpoint shows an earlier run, it opens the feed with ``include_initial=True`` and
  emits every row of the table again as a snapshot insert (``snapshot=True``, and
  ``meta={"resync": n}`` for the n-th re-read), whatever the operation mask. A consumer that
  upserts by primary key converges to the table's state for every row that exists.
  **Rows deleted while the feed was disconnected are not reported**: the re-read only shows
  what exists. A consumer that must drop them replaces, once the re-read is complete (the
  first change or idle tick without ``meta["resync"] == n``), every row whose key it did not
  see in re-read ``n``. With ``resync=False`` the changes made while disconnected are lost.
* **Positions do not resume anything.** A change's position is ``"<run>:<seq>"``: ``run`` the
  wall-clock time in milliseconds at which the stream was opened (strictly increasing within a
  feed), ``seq`` its number within that stream, both zero-padded, so positions increase as
  strings across reconnects, and across restarts as long as the clock does not go back. The
  checkpoint store keeps them like any other position, but RethinkDB cannot continue from one:
  `on_acknowledge` does nothing, and a saved checkpoint only tells a new run that an earlier
  one delivered changes, so it must re-sync. Without a persistent checkpoint (the default is in
  memory) a restarted process cannot know that: give one, or use ``prefeed="snapshot"``.

At least once, here, means: a change made while the feed is connected is emitted once; a change
that was not delivered before a failure, or that happened while the feed was away, is not
replayed as such, but the re-sync emits the current state of its row, which may repeat states
the consumer already had (and cannot show deletions, see above). Consumers must upsert by key.

``prefeed="snapshot"``: the first stream is opened with ``include_initial=True``, so the
table's rows come first as snapshot inserts and the changes follow without gap; changes made
during the read arrive interleaved with it, as RethinkDB sends them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import rethinkdb.net
from rethinkdb import r
from rethinkdb.errors import (
    ReqlAuthError,
    ReqlAvailabilityError,
    ReqlCompileError,
    ReqlCursorEmpty,
    ReqlDriverError,
    ReqlError,
    ReqlOpFailedError,
    ReqlPermissionError,
    ReqlQueryLogicError,
    ReqlResourceLimitError,
    ReqlRuntimeError,
    ReqlTimeoutError,
)

from changefeed.change import ALL, Change, Operation, Position
from changefeed.errors import (
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    TransientBackendError,
    first_line,
)
from changefeed.feed import ChangeFeed
from changefeed.registry import register_backend

log = logging.getLogger("changefeed.rethinkdb")

DEFAULT_PORT = 28015
DEFAULT_DB = "test"

_INSERT = Operation.INSERT
_UPDATE = Operation.UPDATE
_DELETE = Operation.DELETE


# -- the pure decoder ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class State:
    """A ``{"state": ...}`` document of the feed: ``"initializing"`` or ``"ready"``.

    ``ready`` means the initial read (``include_initial``) is complete: what follows are changes.
    """

    state: str


def decode_change(
    doc: Mapping[str, Any],
    table: str,
    primary_key: str = "id",
    *,
    position: Position = None,
    snapshot_meta: dict[str, Any] | None = None,
) -> Change | State | None:
    """Turn one document of a RethinkDB changefeed into a `Change`, a `State`, or None.

    Args:
        doc: a document from a ``changes(include_types=True, include_states=True)`` cursor
            (documents without ``type`` are understood too, from their ``old_val``/``new_val``).
        table: the qualified ``db.table`` name the changes get.
        primary_key: the table's primary key, for ``Change.key``.
        position: the position the change gets (see the module documentation).
        snapshot_meta: the ``meta`` of ``initial`` rows (e.g. ``{"resync": 1}``).

    Returns None for documents that are no change (``uninitial``). Raises
    `TransientBackendError` for an ``{"error": ...}`` document: RethinkDB puts one in the
    stream when it had to drop changes (its queue overflowed), so the feed must re-sync.
    """
    kind = doc.get("type")
    if kind == "add":
        new = doc["new_val"]
        return Change(_INSERT, table, new, None, {primary_key: new.get(primary_key)}, position)
    if kind == "change":
        new = doc["new_val"]
        return Change(
            _UPDATE, table, new, doc.get("old_val"), {primary_key: new.get(primary_key)}, position
        )
    if kind == "remove":
        old = doc["old_val"]
        return Change(_DELETE, table, None, old, {primary_key: old.get(primary_key)}, position)
    if kind == "initial":
        new = doc["new_val"]
        return Change(
            _INSERT, table, new, None, {primary_key: new.get(primary_key)}, position,
            None, None, True, snapshot_meta,
        )
    if kind == "uninitial":
        return None
    if kind == "state" or (kind is None and "state" in doc):
        return State(str(doc["state"]))
    if "error" in doc:
        raise TransientBackendError(f"RethinkDB reported on the changefeed of {table}: "
                                    f"{doc['error']}")
    if kind is None:  # a feed opened without include_types
        new, old = doc.get("new_val"), doc.get("old_val")
        if new is not None and old is not None:
            return decode_change({**doc, "type": "change"}, table, primary_key, position=position)
        if new is not None:
            return decode_change({**doc, "type": "add"}, table, primary_key, position=position)
        if old is not None:
            return decode_change({**doc, "type": "remove"}, table, primary_key, position=position)
        return None
    raise PermanentBackendError(f"unknown RethinkDB changefeed document type {kind!r} on {table}")


def make_position(run: int, seq: int) -> str:
    """The position of the ``seq``-th change of the stream opened at ``run`` (Unix ms)."""
    return f"{run:013d}:{seq:010d}"


# -- errors --------------------------------------------------------------------------------------


def is_transient_error(exc: BaseException) -> bool:
    """Whether reconnecting may cure ``exc`` (a pure predicate on the exception).

    Transient: a lost or refused connection (`ReqlDriverError`, timeouts, ``OSError``), an
    unavailable table or replica (`ReqlAvailabilityError`, except "does not exist"), a
    changefeed the server aborted or whose queue overflowed. Permanent: login failures,
    missing databases or tables, missing permissions, bad queries.
    """
    if isinstance(exc, ChangefeedError):
        return isinstance(exc, TransientBackendError)
    if isinstance(exc, ReqlAuthError):
        return False
    if isinstance(exc, ReqlDriverError):  # connection lost or refused, ReqlTimeoutError
        return True
    if isinstance(exc, ReqlAvailabilityError):  # ReqlOpFailedError, ReqlOpIndeterminateError
        return "does not exist" not in str(exc)
    if isinstance(exc, ReqlResourceLimitError):
        return "changefeed" in str(exc).lower()
    if isinstance(exc, (ReqlPermissionError, ReqlQueryLogicError, ReqlCompileError)):
        return False
    if type(exc) is ReqlRuntimeError:  # what the driver gives cursors of a closed connection
        return "connection is closed" in str(exc).lower()
    if isinstance(exc, ReqlError):
        return False
    return isinstance(exc, OSError)


# -- connections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionParams:
    """Where to connect, parsed from ``rethinkdb://[user:password@]host[:port][/db]``."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    db: str = DEFAULT_DB
    user: str = "admin"
    password: str = field(default="", repr=False)
    timeout: float = 20.0

    @classmethod
    def from_url(cls, url: str) -> ConnectionParams:
        """Parse a ``rethinkdb://`` URL; ``?timeout=seconds`` sets the connect timeout."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "rethinkdb":
            raise ConfigurationError(f"not a rethinkdb:// URL: {parts.scheme or 'no'} scheme")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise ConfigurationError(f"bad RethinkDB URL: {exc}") from exc
        query = parse_qs(parts.query)
        try:
            timeout = float(query.get("timeout", ["20"])[0])
        except ValueError as exc:
            raise ConfigurationError(f"bad RethinkDB URL: timeout {exc}") from exc
        db = unquote(parts.path.strip("/")) or DEFAULT_DB
        if "/" in db:
            raise ConfigurationError(f"bad RethinkDB URL: {db!r} is not a database name")
        return cls(
            host=parts.hostname or "localhost",
            port=port,
            db=db,
            user=unquote(parts.username) if parts.username else "admin",
            password=unquote(parts.password) if parts.password else "",
            timeout=timeout,
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


# -- the feed ------------------------------------------------------------------------------------


class RethinkChangeFeed(ChangeFeed):
    """Changes of one RethinkDB table, through ``table.changes()``.

    RethinkDB cannot resume a changefeed: after a reconnect the feed re-reads the table and
    emits its rows as snapshot inserts (see the module documentation), so consumers must
    upsert by primary key.

    Args:
        table: ``"db.table"``, or ``"table"`` in the connection's database.
        operation: the operations to emit (`Operation` flags). Snapshot and re-sync rows are
            emitted whatever the mask.
        prefeed: an iterable replayed first, or ``"snapshot"``: the table's rows as snapshot
            inserts, then its changes, without gap.
        connection: a ``rethinkdb://[user:password@]host[:port][/db]`` URL (port 28015 and
            database ``test`` by default), or an open driver connection (reconnected when it
            dropped, never closed by the feed).
        resync: re-read the table after a reconnect or restart (see above).
        poll_interval: seconds to wait for a change before yielding an idle tick.
        queue_size: the server's ``changefeed_queue_size`` (changes it buffers for a slow
            feed before dropping them, which forces a re-sync); None for the server's default.
        Other arguments as for `ChangeFeed`.
    """

    supports_snapshot = True
    resume = "resync"

    def __init__(
        self,
        table: str,
        operation: int = ALL,
        *,
        prefeed: Any = None,
        connection: Any = None,
        resync: bool = True,
        poll_interval: float = 0.5,
        queue_size: int | None = None,
        **options: Any,
    ) -> None:
        if isinstance(connection, str) or connection is None:
            self.params = ConnectionParams.from_url(connection or "rethinkdb://")
            self._given: Any = None
        elif isinstance(connection, rethinkdb.net.Connection):
            self.params = ConnectionParams(
                host=connection.host, port=connection.port, db=connection.db or DEFAULT_DB
            )
            self._given = connection
        else:
            raise ConfigurationError(
                f"cannot use a {type(connection).__name__} as a RethinkDB connection"
            )
        name = (table or "").strip()
        db, _, table_name = name.rpartition(".")
        if not table_name:
            raise ConfigurationError("no table given")
        self.db = db or self.params.db
        self.table_name = table_name
        super().__init__(
            f"{self.db}.{table_name}", operation, prefeed=prefeed, connection=connection, **options
        )
        self.resync = resync
        self.poll_interval = poll_interval
        self.queue_size = queue_size
        self.primary_key = "id"
        self.stats.extra.setdefault("resyncs", 0)
        self._conn: Any = None
        self._cursor: Any = None
        self._connected_before = False
        self._streamed = False
        """Whether a stream was ever opened: a later run follows a reconnect."""
        self._restarted = self.acknowledged is not None
        """A checkpoint exists: an earlier run of this feed delivered changes."""
        self._snapshot_done = False
        self._run = 0

    # -- the stream ----------------------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        snapshot = self.prefeed == "snapshot" and not self._snapshot_done
        reconnect = self._streamed or self._restarted
        resyncing = self.resync and reconnect
        include_initial = snapshot or resyncing
        self._connect()
        self.primary_key = self._lookup_primary_key()
        self._cursor = cursor = self._open_changes(include_initial)
        self._streamed = True
        if reconnect and not resyncing:
            log.warning("changes to %s made while the feed was disconnected are lost: RethinkDB"
                        " cannot resume a changefeed and resync is off", self.table)
        elif resyncing:
            log.info("re-reading %s: RethinkDB cannot resume a changefeed", self.table)
        self._run = run = max(int(time.time() * 1000), self._run + 1)
        resync_number = self.stats.extra.get("resyncs", 0) + 1
        snapshot_meta = {"resync": resync_number} if resyncing else None
        table, primary_key, mask = self.table, self.primary_key, self.operation
        wait = self.poll_interval
        read = cursor.next
        seq = 0
        initial_rows = 0
        reading = include_initial

        monotonic = time.monotonic
        last_yield = monotonic()

        # The hot loop: one iteration per document.
        while True:
            try:
                doc = read(wait=wait)
            except ReqlTimeoutError:
                yield None
                last_yield = monotonic()
                continue
            except ReqlCursorEmpty as exc:  # a StopIteration: must not escape a generator
                raise TransientBackendError(f"the RethinkDB changefeed of {table} ended") from exc
            seq += 1
            event = decode_change(
                doc, table, primary_key, position=make_position(run, seq),
                snapshot_meta=snapshot_meta,
            )
            if event.__class__ is Change:
                if event.snapshot:
                    initial_rows += 1
                    yield event
                    last_yield = monotonic()
                    continue
                if event.operation & mask:
                    yield event
                    last_yield = monotonic()
                    continue
            elif event.__class__ is State and event.state == "ready" and reading:
                reading = False
                self._initial_read_done(initial_rows, resyncing, snapshot)
            # Nothing for the consumer: still tick while changes outside the mask stream in.
            if monotonic() - last_yield >= wait:
                yield None
                last_yield = monotonic()

    def _initial_read_done(self, rows: int, resyncing: bool, snapshot: bool) -> None:
        self._snapshot_done = True
        if resyncing:
            self.stats.extra["resyncs"] = self.stats.extra.get("resyncs", 0) + 1
            log.warning(
                "re-synced %s: re-read %d rows and emitted them as snapshot"
                " inserts (RethinkDB cannot resume a changefeed; consumers must upsert by key)",
                self.table, rows,
            )
        elif snapshot:
            log.info("snapshot of %s: %d rows", self.table, rows)

    # -- the queries (one method each, so tests can replace them) ------------------------------

    def _primary_key(self) -> str:
        """The table's primary key (raises the driver's error for a missing table)."""
        return str(r.db(self.db).table(self.table_name).info().run(self._conn)["primary_key"])

    def _open_changes(self, include_initial: bool) -> Any:
        """Open the changefeed cursor (``next(wait=seconds)`` yields its documents)."""
        options: dict[str, Any] = {}
        if self.queue_size is not None:
            options["changefeed_queue_size"] = self.queue_size
        query = r.db(self.db).table(self.table_name).changes(
            include_types=True,
            include_states=True,
            include_initial=include_initial,
            squash=False,
            **options,
        )
        return query.run(self._conn)

    # -- setup ---------------------------------------------------------------------------------

    def _open_connection(self) -> Any:
        """Open a driver connection, or reopen the one given if it dropped."""
        given = self._given
        if given is not None:
            if not given.is_open():
                given.reconnect(noreply_wait=False)
            return given
        params = self.params
        return r.connect(
            host=params.host, port=params.port, db=params.db, user=params.user,
            password=params.password, timeout=params.timeout,
        )

    def _connect(self) -> None:
        if self._conn is not None:
            return
        params = self.params
        try:
            self._conn = self._open_connection()
        except ReqlAuthError as exc:
            raise PermanentBackendError(
                f"cannot log in to RethinkDB at {params.where} as {params.user!r}: "
                f"{_reason(exc)}"
            ) from exc
        except ReqlDriverError as exc:
            if not self._connected_before:
                raise PermanentBackendError(
                    f"cannot connect to RethinkDB at {params.where}: {_reason(exc)}"
                ) from exc
            raise
        self._connected_before = True
        self.mark_connected()

    def _lookup_primary_key(self) -> str:
        try:
            return self._primary_key()
        except ReqlOpFailedError as exc:
            text = str(exc)
            if "does not exist" not in text:
                raise
            if text.startswith("Database"):
                raise ConfigurationError(
                    f"database {self.db!r} does not exist on RethinkDB at {self.params.where}"
                ) from exc
            raise ConfigurationError(
                f"table {self.table_name!r} does not exist in RethinkDB database {self.db!r}"
            ) from exc
        except ReqlPermissionError as exc:
            raise PermanentBackendError(
                f"no permission to read {self.table} on RethinkDB at {self.params.where}:"
                f" {_reason(exc)}"
            ) from exc

    # -- the rest of the backend interface -----------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        """See `is_transient_error`."""
        return is_transient_error(exc)

    def on_acknowledge(self, position: Position) -> None:
        """Nothing to tell: RethinkDB keeps no position of a changefeed."""

    def close(self) -> None:
        """Close the cursor, and the connection if the feed opened it."""
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            try:
                cursor.close()
            except (ReqlError, OSError):
                pass
        conn, self._conn = self._conn, None
        if conn is not None and conn is not self._given:
            try:
                conn.close(noreply_wait=False)
            except (ReqlError, OSError):
                pass

    def __repr__(self) -> str:
        return f"RethinkChangeFeed({self.table!r}, {self.operation!r}, resync={self.resync!r})"


def _reason(exc: BaseException) -> str:
    """The first line of the driver's message, without its "Could not connect to h:p" prefix."""
    text = re.sub(r"^Could not connect to \S+?[.,] (Error: )?", "", first_line(exc))
    return text or type(exc).__name__


# -- registration --------------------------------------------------------------------------------


register_backend(
    "rethinkdb", RethinkChangeFeed, connection_types=[rethinkdb.net.DefaultConnection]
)
