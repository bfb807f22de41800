"""Which backend serves a connection: `get_changefeed`, `register_backend`, `backend_for_url`.

A backend is known before it is imported: a `Backend` record names its module, the URL schemes
it serves and the driver packages whose connection objects it takes (`BUILTIN_BACKENDS` below;
`declare_backend` adds others). Nothing imports a backend's driver until a feed asks for
it; importing the backend's module then calls `register_backend`, which tells
`get_changefeed` how to make its feeds from a URL and from the driver's connection objects.

    >>> backend_for_url("postgresql://db/app").name
    'postgres'
    >>> backend_for_url("host=db dbname=app").title      # a libpq conninfo string
    'PostgreSQL'
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from changefeed.change import ALL
from changefeed.errors import ConfigurationError
from changefeed.feed import ChangeFeed
from changefeed.preflight import looks_like_conninfo


@dataclass(frozen=True)
class Backend:
    """What is known of a backend before its module (and driver) is imported."""

    name: str
    """Short name, also the pip extra that installs its driver (``changefeed[mongodb]``)."""
    title: str
    """The database's name in messages (``MongoDB``)."""
    module: str
    """The module whose import registers it."""
    schemes: tuple[str, ...] = ()
    """URL schemes it serves, lower case (``postgresql``)."""
    drivers: tuple[str, ...] = ()
    """Top-level packages of the connection objects it takes (``pymongo``)."""
    accepts: Callable[[str], bool] | None = None
    """Recognises connection strings without a scheme (libpq's ``host=db dbname=app``)."""


BUILTIN_BACKENDS = (
    Backend("postgres", "PostgreSQL", "changefeed.backends.postgres",
            schemes=("postgresql", "postgres"), drivers=("psycopg",),
            accepts=looks_like_conninfo),
    Backend("mongodb", "MongoDB", "changefeed.backends.mongodb",
            schemes=("mongodb", "mongodb+srv"), drivers=("pymongo",)),
    Backend("rethinkdb", "RethinkDB", "changefeed.backends.rethinkdb",
            schemes=("rethinkdb",), drivers=("rethinkdb",)),
)
"""The backends that come with changefeed, each in ``changefeed.backends``."""

_DECLARED: dict[str, Backend] = {backend.name: backend for backend in BUILTIN_BACKENDS}
_REGISTERED: dict[str, tuple[type[ChangeFeed], Callable[[str], None] | None]] = {}


def declare_backend(backend: Backend) -> None:
    """Make ``backend`` known, so URLs and connections of its kind import it when needed."""
    _DECLARED[backend.name] = backend


def declared_backends() -> list[Backend]:
    """Every declared backend, in declaration order."""
    return list(_DECLARED.values())


def register_backend(
    name: str,
    feed_class: type[ChangeFeed],
    *,
    connection_types: Iterable[type] = (),
    check_url: Callable[[str], None] | None = None,
) -> None:
    """Called by a backend's module when it is imported: `get_changefeed` then makes its feeds
    as ``feed_class(table, operation, prefeed=..., connection=..., **options)`` for a URL of
    the declared backend ``name`` and for a connection of one of ``connection_types``.

    ``check_url`` raises `ConfigurationError` for a malformed URL before the feed is made
    (default: what ``urllib`` cannot split)."""

    def make_feed(
        connection: Any, table: str, operation: int = ALL, *, prefeed: Any = None,
        **options: Any,
    ) -> ChangeFeed:
        return feed_class(table, operation, prefeed=prefeed, connection=connection, **options)

    _REGISTERED[name] = (feed_class, check_url)
    for connection_type in connection_types:
        get_changefeed.register(connection_type)(make_feed)


_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case (``postgresql``), or "" for a string without one.

    Only the scheme is read, so a malformed rest (``postgresql://[bad``) is left for the
    backend to report."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def backend_for_url(url: str) -> Backend | None:
    """The declared backend serving ``url`` (by its scheme or its own test), or None."""
    scheme = url_scheme(url)
    for backend in declared_backends():
        if scheme in backend.schemes or (
            not scheme and backend.accepts is not None and backend.accepts(url)
        ):
            return backend
    return None


def is_postgresql_url(url: str) -> bool:
    """Whether ``url`` goes to the PostgreSQL backend (``postgresql://``, ``postgres://``, or a
    ``key=value`` conninfo string): several options of the CLI apply to it only."""
    backend = backend_for_url(url)
    return backend is not None and backend.name == "postgres"


def _check_url(url: str, title: str) -> None:
    """Raise `ConfigurationError` for a URL ``urllib`` cannot split (unbalanced brackets):
    what drivers other than libpq parse URLs with."""
    try:
        urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"bad {title} URL: {exc}") from exc


def _load(backend: Backend) -> tuple[type[ChangeFeed], Callable[[str], None] | None]:
    if backend.name not in _REGISTERED:
        try:
            importlib.import_module(backend.module)
        except ImportError as exc:
            raise ConfigurationError(
                f"the {backend.name} backend needs its driver: pip install"
                f" 'changefeed[{backend.name}]' ({exc})"
            ) from exc
    return _REGISTERED[backend.name]


@functools.singledispatch
def get_changefeed(
    connection: Any,
    table: str,
    operation: int = ALL,
    *,
    prefeed: Iterable[Any] | str | None = None,
    **options: Any,
) -> ChangeFeed:
    """Return the feed of ``table`` for ``connection``'s backend.

    Dispatches on the connection's type: a psycopg ``Connection``, a pymongo ``MongoClient`` /
    ``Database`` / ``Collection``, a rethinkdb connection, or a URL string
    (``postgresql://``, ``mongodb://``, ``rethinkdb://``). ``options`` go to the backend's feed.
    """
    package = type(connection).__module__.partition(".")[0]
    for backend in declared_backends():
        if package in backend.drivers:
            _load(backend)  # registers the driver's connection types
            factory = get_changefeed.dispatch(type(connection))
            if factory is not get_changefeed.registry[object]:
                return factory(connection, table, operation, prefeed=prefeed, **options)
    drivers = [driver for backend in declared_backends() for driver in backend.drivers]
    named = ", ".join(drivers[:-1]) + f" or {drivers[-1]}" if len(drivers) > 1 else drivers[0]
    raise ConfigurationError(
        f"no changefeed backend for a {type(connection).__module__}.{type(connection).__name__};"
        f" pass a {named} connection, or a URL"
    )


@get_changefeed.register(str)
def _get_changefeed_from_url(
    connection: str, table: str, operation: int = ALL, *, prefeed: Any = None, **options: Any
) -> ChangeFeed:
    backend = backend_for_url(connection)
    if backend is None:
        scheme = url_scheme(connection)
        known = ", ".join(
            f"{scheme}://" for backend in declared_backends() for scheme in backend.schemes
        )
        shown = f"{scheme}://" if scheme else "no scheme"
        raise ConfigurationError(
            f"unsupported URL ({shown}): use one of {known} (or a PostgreSQL"
            " 'host=... dbname=...' string)"
        )
    feed_class, check_url = _load(backend)
    if check_url is not None:
        check_url(connection)
    else:
        _check_url(connection, backend.title)
    return feed_class(table, operation, prefeed=prefeed, connection=connection, **options)


__all__ = [
    "BUILTIN_BACKENDS",
    "Backend",
    "backend_for_url",
    "declare_backend",
    "declared_backends",
    "get_changefeed",
    "is_postgresql_url",
    "register_backend",
    "url_scheme",
]
