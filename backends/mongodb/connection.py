"""Setting up a change stream: names, clients, the collection check and watch() options.

The functions that need a server take the pymongo object to use (client or collection) and
do one exchange each; the rest (`resolve_names`, `split_connection`, `server_address` of a
URL, `watch_options`) are pure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import pymongo
import pymongo.errors
from pymongo.collection import Collection
from pymongo.database import Database

from changefeed.backends.mongodb.errors import lacks_pre_images
from changefeed.backends.mongodb.events import operation_types
from changefeed.errors import ConfigurationError, first_line

log = logging.getLogger("changefeed.mongodb")

PRE_IMAGES = "full_document_before_change"
"""The watch() argument that asks for pre-images."""


def resolve_names(table: str, connection: Any, database: str | None = None) -> tuple[str, str]:
    """(database, collection) of ``table`` for a connection (URL or pymongo object).

    The database comes from ``table`` (``db.collection``), the ``database`` argument, a
    `Database` or `Collection` given as the connection, or the URL's path (or the client's
    default database); a collection name may contain dots when the database is known.
    """
    if not table or not isinstance(table, str):
        raise ConfigurationError("no collection given")
    if isinstance(connection, Collection):
        db, coll = connection.database.name, connection.name
        if table not in (coll, f"{db}.{coll}"):
            raise ConfigurationError(
                f"the collection {table!r} does not match the Collection given ({db}.{coll})"
            )
        return db, coll
    if isinstance(connection, Database):
        database = database or connection.name
    if database:
        prefix = f"{database}."
        return database, table[len(prefix):] if table.startswith(prefix) else table
    if "." in table:
        db, _, coll = table.partition(".")
        if db and coll:
            return db, coll
    default = None
    if isinstance(connection, str):
        default = unquote(urlsplit(connection).path.lstrip("/")) or None
    elif isinstance(connection, pymongo.MongoClient):
        try:
            default = connection.get_default_database().name
        except pymongo.errors.ConfigurationError:
            default = None
    if not default:
        raise ConfigurationError(
            f"no database for collection {table!r}: give it as <database>.{table} or in the URL"
            " (mongodb://host/<database>)"
        )
    return default, table


def split_connection(connection: Any) -> tuple[str | None, Any, Any]:
    """(URL, client, collection) of a feed's connection; what is not given is None.

    A collection-like object (with ``watch`` and ``find``) is taken as a collection: tests
    put a fake at this boundary.
    """
    if isinstance(connection, str):
        return connection, None, None
    if isinstance(connection, Collection):
        return None, connection.database.client, connection
    if isinstance(connection, Database):
        return None, connection.client, None
    if isinstance(connection, pymongo.MongoClient):
        return None, connection, None
    if hasattr(connection, "watch") and hasattr(connection, "find"):
        return None, None, connection
    if connection is None:
        raise ConfigurationError("no MongoDB connection given: pass a mongodb:// URL")
    raise ConfigurationError(
        f"cannot use a {type(connection).__name__} as a MongoDB connection: pass a"
        " mongodb:// URL, a MongoClient, a Database or a Collection"
    )


def make_client(url: str | None, options: Mapping[str, Any]) -> pymongo.MongoClient:
    """A client for ``url``: timezone-aware, named "changefeed", failing server selection
    after 5 s unless the URL or ``options`` say otherwise. Connects in the background."""
    settings: dict[str, Any] = {"tz_aware": True, "appname": "changefeed"}
    if "serverselectiontimeoutms" not in (url or "").lower():
        settings["serverSelectionTimeoutMS"] = 5000
    settings.update(options)
    try:
        return pymongo.MongoClient(url, **settings)
    except (pymongo.errors.ConfigurationError, ValueError) as exc:  # InvalidURI, bad port
        raise ConfigurationError(f"bad MongoDB URL: {first_line(exc)}") from exc


def server_address(url: str | None, client: Any) -> str:
    """``host:port`` of the server for messages: from the URL (credentials left out), else
    from the client's seed list."""
    if url is not None:
        netloc = urlsplit(url).netloc
        return unquote(netloc.rpartition("@")[2]) or "localhost:27017"
    try:
        seeds = client.topology_description.server_descriptions()
        return ",".join(f"{host}:{port}" for host, port in seeds) or "the server"
    except Exception:  # no client, or a fake one: the message still reads well
        return "the server"


def check_collection(collection: Any, table: str) -> None:
    """Warn about a collection that does not exist (watching it is allowed).

    This is the feed's first exchange with the server, so a server that cannot be reached
    fails here.
    """
    try:
        names = collection.database.list_collection_names(filter={"name": collection.name})
    except pymongo.errors.OperationFailure as exc:  # e.g. no listCollections privilege
        log.debug("cannot list the collections of %s: %s", collection.database.name, exc)
        return
    if collection.name not in names:
        log.warning("collection %s does not exist (yet); watching it anyway", table)


def watch_options(
    operation: int,
    start: Mapping[str, Any],
    *,
    max_await_ms: int,
    full_document: str | None,
    pre_images: str | None,
) -> dict[str, Any]:
    """The watch() arguments: a ``$match`` on the operation types of ``operation`` (and the
    stream's ends), ``start`` (`Start.watch`), and the documents to ask for.

    ``pre_images`` None asks for them when available; ``"off"`` never.
    """
    options: dict[str, Any] = {
        "pipeline": [{"$match": {"operationType": {"$in": operation_types(operation)}}}],
        "max_await_time_ms": max_await_ms,
        **start,
    }
    if full_document is not None:
        options["full_document"] = full_document
    if pre_images != "off":
        options[PRE_IMAGES] = "whenAvailable" if pre_images is None else pre_images
    return options


def open_stream(
    collection: Any, options: Mapping[str, Any], *, pre_images_optional: bool, server: str
) -> tuple[Any, bool]:
    """``collection.watch(**options)``, and whether the server refused pre-images.

    A server older than 6.0 refuses the pre-images option; when they were only asked for if
    available (``pre_images_optional``), the stream is opened again without them.
    """
    try:
        return collection.watch(**options), False
    except pymongo.errors.OperationFailure as exc:
        if not (pre_images_optional and PRE_IMAGES in options and lacks_pre_images(exc)):
            raise
    log.info("MongoDB at %s has no pre-images (6.0+): old documents hold keys only", server)
    without = {name: value for name, value in options.items() if name != PRE_IMAGES}
    return collection.watch(**without), True


__all__ = [
    "check_collection",
    "make_client",
    "open_stream",
    "resolve_names",
    "server_address",
    "split_connection",
    "watch_options",
]
