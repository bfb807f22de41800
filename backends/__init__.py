"""Backends: one package per source of changes, each pure decoding plus a thin I/O loop.

A backend is imported when it is first needed, so that starting the CLI does not import every
driver: `changefeed.get_changefeed` finds the backend of a URL by its scheme, and of a
driver's connection object by the driver's package name, in the `Backend` records below;
importing the backend's module then registers it (`changefeed.registry.register_backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

__all__ = ["BUILTIN_BACKENDS", "Backend"]
