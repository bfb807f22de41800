"""`MongoChangeFeed`: the I/O loop over a change stream (see the package docstring).

Decoding, positions, error classification and the stream's set-up live in their own modules;
this one opens the stream where `where_to_start` says, reads the snapshot when asked, hands out
the decoded changes and remembers the latest resume token for an in-process reconnect.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import pymongo
import pymongo.errors
from pymongo.collection import Collection
from pymongo.database import Database

from changefeed.backends.mongodb.connection import (
    check_collection,
    make_client,
    open_stream,
    resolve_names,
    server_address,
    split_connection,
    watch_options,
)
from changefeed.backends.mongodb.errors import (
    classify_error,
    is_history_lost,
    is_transient_error,
)
from changefeed.backends.mongodb.events import StreamEnded, decode_event, snapshot_change
from changefeed.backends.mongodb.positions import (
    Start,
    resume_options,
    snapshot_position,
    token_position,
    where_to_start,
)
from changefeed.change import ALL, Change, Position
from changefeed.errors import ConfigurationError, PermanentBackendError, first_line
from changefeed.feed import ChangeFeed
from changefeed.registry import register_backend

log = logging.getLogger("changefeed.mongodb")

_PRE_IMAGES = (None, False, "whenAvailable", "required", "off")
_FULL_DOCUMENTS = (None, "default", "updateLookup", "whenAvailable", "required")


class MongoChangeFeed(ChangeFeed):
    """Changes of one MongoDB collection, through a change stream (see the package docstring).

    Nothing is kept on the server: the checkpoint store keeps the acknowledged resume token,
    so acknowledging tells the server nothing.

    Args:
        table: ``"db.collection"``, or ``"collection"`` when the database comes from the URL's
            path, the ``database`` argument, or a `Database` / `Collection` connection.
        operation: the operations to emit (`Operation` flags); the server filters the rest.
        prefeed: an iterable replayed first, or ``"snapshot"``: on the first run every document
            of the collection as a snapshot insert, then the stream (at least once).
        connection: a ``mongodb://`` / ``mongodb+srv://`` URL, or a pymongo ``MongoClient``,
            ``Database`` or ``Collection``. A client made from a URL is closed by `close()`;
            one passed in is left open.
        full_document: ``"updateLookup"`` (default), ``"whenAvailable"`` / ``"required"``
            (post-images, 6.0+), or None (updates without ``new`` unless pre-images rebuild it).
        pre_images: None (ask for pre-images when available), ``"whenAvailable"``,
            ``"required"``, or False (never ask).
        resync: on ChangeStreamHistoryLost, re-read the collection as a snapshot instead of
            failing with `ResumeError`.
        database: the database of ``table`` when it is not in ``table`` or the URL.
        max_await_ms: how long the server holds a getMore when nothing happens (< 1000, so the
            feed ticks at least once a second).
        chunk_size: documents read per round trip while reading the snapshot (PostgreSQL's
            rows per snapshot chunk; ``snapshot_batch``, its old name, still works).
        client_options: extra keyword arguments for the ``MongoClient`` made from a URL
            (defaults: ``tz_aware=True``, ``serverSelectionTimeoutMS=5000``).
        Other arguments as for `ChangeFeed` (checkpoint, retry, name).
    """

    supports_snapshot = True

    def __init__(
        self,
        table: str,
        operation: int = ALL,
        *,
        prefeed: Any = None,
        connection: Any = None,
        full_document: str | None = "updateLookup",
        pre_images: str | bool | None = None,
        resync: bool = False,
        database: str | None = None,
        max_await_ms: int = 500,
        chunk_size: int = 1000,
        snapshot_batch: int | None = None,
        client_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if snapshot_batch is not None:
            warnings.warn("snapshot_batch= is now chunk_size=", DeprecationWarning, stacklevel=2)
            chunk_size = snapshot_batch
        if pre_images not in _PRE_IMAGES:
            raise ConfigurationError(
                f"unknown pre_images {pre_images!r}: use 'whenAvailable', 'required' or False"
            )
        if full_document not in _FULL_DOCUMENTS:
            raise ConfigurationError(
                f"unknown full_document {full_document!r}: use 'updateLookup', 'whenAvailable',"
                " 'required' or None"
            )
        self.database_name, self.collection_name = resolve_names(table, connection, database)
        self._url, self._client, self._collection = split_connection(connection)
        super().__init__(
            f"{self.database_name}.{self.collection_name}", operation, prefeed=prefeed,
            connection=connection, **options,
        )
        self.full_document = None if full_document == "default" else full_document
        self.pre_images = "off" if pre_images is False else pre_images
        self.resync = resync
        self.max_await_ms = max_await_ms
        self.chunk_size = chunk_size
        self.client_options = dict(client_options or {})
        self.ended: StreamEnded | None = None
        """Set when the stream ended (collection dropped or renamed, ...): why."""
        self._pre_images_refused = False
        # In-process resume state: watch() options to resume after the latest token the
        # stream reported, and the position of the last change yielded. While that change is
        # acknowledged, resuming from the latest token skips nothing the consumer has not seen.
        self._latest: dict[str, Any] | None = None
        self._yielded: Position = self.acknowledged

    # -- the stream ----------------------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        self.ended = None
        try:
            collection = self._get_collection()
            if not self.connected_once:
                check_collection(collection, self.table)
                self.mark_connected()
            start = where_to_start(
                self.acknowledged, latest=self._latest, yielded=self._yielded,
                snapshot_prefeed=self.prefeed == "snapshot", feed_id=self.feed_id,
            )
            if start.snapshot_again:
                log.info("the snapshot of %s was not completed: taking it again", self.table)
            while True:
                try:
                    yield from self._stream(collection, start)
                    return
                except pymongo.errors.OperationFailure as exc:
                    if not (self.resync and is_history_lost(exc)):
                        raise
                    log.warning(
                        "the resume token of %s is older than the oplog: re-reading the"
                        " collection (resync)", self.table,
                    )
                    self._latest = None
                    start = Start(snapshot=True)
        except pymongo.errors.PyMongoError as exc:
            error = classify_error(exc, table=self.table, server=self._server())
            raise (error or PermanentBackendError(first_line(exc))) from exc

    def _stream(self, collection: Any, start: Start) -> Iterator[Change | None]:
        stream = self._watch(collection, start)
        # Until the stream moves past it, a start_after token must be used as such again.
        start_after = start.watch.get("start_after")
        try:
            opened_at = stream.resume_token
            if opened_at is not None:
                self._latest = resume_options(opened_at, start_after)
            log.info("watching %s %s", self.table, start.description)
            if start.snapshot:
                yield from self._read_snapshot(collection, opened_at)
            mask = self.operation
            table = self.table
            full_document = self.full_document
            ending: StreamEnded | None = None
            try_next = stream.try_next
            while True:
                event = try_next()
                token = stream.resume_token
                if token is not None:
                    self._latest = resume_options(token, start_after)
                if event is None:
                    yield None
                    continue
                result = decode_event(event, table, full_document=full_document)
                if result is None:
                    continue
                if type(result) is Change:
                    if result.operation & mask:
                        self._yielded = result.position
                        yield result
                    continue
                assert isinstance(result, StreamEnded)
                if not result.final:  # drop / rename / dropDatabase: an invalidate follows
                    ending = ending or result
                    continue
                self._latest = {"start_after": dict(event["_id"])}
                self.ended = ending or result
                self.stats.extra["ended"] = self.ended.message
                log.warning("%s", self.ended.message)
                return
        finally:
            try:
                stream.close()
            except pymongo.errors.PyMongoError:
                pass

    def _watch(self, collection: Any, start: Start) -> Any:
        options = watch_options(
            self.operation, start.watch, max_await_ms=self.max_await_ms,
            full_document=self.full_document,
            pre_images="off" if self._pre_images_refused else self.pre_images,
        )
        stream, refused = open_stream(
            collection, options, pre_images_optional=self.pre_images is None,
            server=self._server(),
        )
        self._pre_images_refused = self._pre_images_refused or refused
        return stream

    def _read_snapshot(self, collection: Any, opened_at: Any) -> Iterator[Change]:
        """Every document of the collection as a snapshot insert, positioned at the token of
        the stream opened before the read."""
        opened = token_position(opened_at) if opened_at is not None else {}
        table = self.table

        def make(document: dict[str, Any], number: int, last: bool) -> Change:
            return snapshot_change(document, table, snapshot_position(opened, number, last))

        documents = collection.find(batch_size=self.chunk_size)
        for change in self.snapshot_changes(documents, make, "documents"):
            self._yielded = change.position
            yield change

    # -- connections ---------------------------------------------------------------------------

    def _get_collection(self) -> Any:
        if self._collection is not None:
            return self._collection
        if self._client is None:
            self._client = make_client(self._url, self.client_options)
        return self._client[self.database_name][self.collection_name]

    def _server(self) -> str:
        return server_address(self._url, self._client)

    def close(self) -> None:
        """Close the client if the feed made it from a URL; a client passed in stays open."""
        if self._url is not None and self._client is not None:
            self._client.close()
            self._client = None

    # -- errors --------------------------------------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        """Lost connections, elections, killed cursors and other resumable server errors."""
        return is_transient_error(exc)

    def __repr__(self) -> str:
        return f"MongoChangeFeed({self.table!r}, {self.operation!r})"


register_backend(
    "mongodb", MongoChangeFeed, connection_types=[pymongo.MongoClient, Database, Collection]
)
