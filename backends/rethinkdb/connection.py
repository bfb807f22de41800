"""Where a RethinkDB feed connects, how it (re)connects, and the two queries it sends.

`ConnectionParams` and `split_table` are pure (URL and name parsing). The rest takes a driver
connection and does the I/O; each function raises changefeed's errors for the failures a user
can act on (see `errors`), and the driver's own for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from rethinkdb import r
from rethinkdb.errors import ReqlError

from changefeed.backends.rethinkdb.errors import connect_error, table_error
from changefeed.errors import ConfigurationError

DEFAULT_PORT = 28015
DEFAULT_DB = "test"


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

    @classmethod
    def of_connection(cls, connection: Any) -> ConnectionParams:
        """Where an open driver connection points (for messages: it keeps its credentials)."""
        return cls(host=connection.host, port=connection.port, db=connection.db or DEFAULT_DB)

    @property
    def where(self) -> str:
        """``host:port``, as messages name the server."""
        return f"{self.host}:{self.port}"


def split_table(name: str | None, default_db: str) -> tuple[str, str]:
    """``"db.table"`` or ``"table"`` (in ``default_db``) as ``(db, table)``."""
    db, _, table = (name or "").strip().rpartition(".")
    if not table:
        raise ConfigurationError("no table given")
    return db or default_db, table


def open_connection(params: ConnectionParams, given: Any = None) -> Any:
    """A connection to the server: ``given`` (reopened if it dropped), else a new one.

    Raises `PermanentBackendError` when the login fails and `TransientBackendError` when the
    server cannot be reached.
    """
    try:
        if given is not None:
            if not given.is_open():
                given.reconnect(noreply_wait=False)
            return given
        return r.connect(
            host=params.host, port=params.port, db=params.db, user=params.user,
            password=params.password, timeout=params.timeout,
        )
    except (ReqlError, OSError) as exc:
        error = connect_error(exc, params.where, params.user)
        if error is None:
            raise
        raise error from exc


def read_primary_key(connection: Any, db: str, table: str, where: str) -> str:
    """The primary key of ``db.table``; a missing database or table is a `ConfigurationError`,
    a missing permission a `PermanentBackendError` (``where`` names the server in both)."""
    try:
        return str(r.db(db).table(table).info().run(connection)["primary_key"])
    except ReqlError as exc:
        error = table_error(exc, db, table, where)
        if error is None:
            raise
        raise error from exc


def open_changes(
    connection: Any, db: str, table: str, *, include_initial: bool, queue_size: int | None = None
) -> Any:
    """Open the changefeed cursor of ``db.table`` (``next(wait=seconds)`` yields its documents).

    ``include_initial`` puts the table's rows first, framed by ``initializing`` / ``ready``
    states; ``queue_size`` is the server's ``changefeed_queue_size`` (None: its default).
    Changes are never squashed: every one of them is a document.
    """
    options: dict[str, Any] = {}
    if queue_size is not None:
        options["changefeed_queue_size"] = queue_size
    query = r.db(db).table(table).changes(
        include_types=True,
        include_states=True,
        include_initial=include_initial,
        squash=False,
        **options,
    )
    return query.run(connection)


def close_quietly(resource: Any, **options: Any) -> None:
    """Close a cursor or connection that may already be broken: its errors no longer matter."""
    try:
        resource.close(**options)
    except (ReqlError, OSError):
        pass
