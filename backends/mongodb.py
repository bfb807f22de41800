"""The MongoDB feed: change streams (``Collection.watch()``) through pymongo.

Mapping of change events (MongoDB's ``operationType``) to `Change`:

* ``insert``  -> INSERT: ``new`` = ``fullDocument``, ``key`` = ``documentKey``.
* ``update``  -> UPDATE: ``new`` = ``fullDocument``; ``old`` = ``fullDocumentBeforeChange``
  (the pre-image) when the collection records pre-images, else only the ``documentKey``;
  ``meta["update_description"]`` holds MongoDB's ``updateDescription`` (updatedFields,
  removedFields, truncatedArrays) and ``meta["new_source"]`` says where ``new`` came from (below).
* ``replace`` -> UPDATE, as an update without an update description.
* ``delete``  -> DELETE: ``old`` = the pre-image, else the ``documentKey``.
* ``invalidate``, ``drop``, ``rename``, ``dropDatabase`` end the feed: it logs one clear line
  (e.g. "collection app.tasks was dropped; the change stream ended") and stops, as
  ``feed.ended`` tells. Iterating the same feed object again starts *after* the invalidate
  (``start_after``), e.g. once the collection was created again; a new feed resuming from a
  checkpoint saved before the end meets the same end again at once (delete the checkpoint to
  start over).
* Any other type (``createIndexes``, ``modify``, ... when the server sends them) is skipped.

``table`` is ``"<db>.<collection>"``; ``committed_at`` the event's ``wallTime`` (6.0+, ms
precision) or its ``clusterTime``, as an aware UTC datetime; ``transaction`` is
``"<lsid uuid>:<txnNumber>"`` for changes made in a multi-document transaction.

Where ``new`` of an update comes from (``meta["new_source"]``):

* ``"lookup"`` (the default, ``full_document="updateLookup"``): the server reads the document
  when it sends the event, so ``new`` is the document *as it is then*, which may include later
  changes: it is NOT a point-in-time image of this update (unlike PostgreSQL). When the document
  was deleted in the meantime the lookup finds nothing;
* ``"post-image"`` (``full_document="whenAvailable"`` or ``"required"``, MongoDB 6.0+ with
  ``changeStreamPreAndPostImages`` enabled on the collection): the document right after this
  update;
* ``"pre-image+update"``: no document came, so ``new`` was rebuilt by applying the update
  description to the pre-image (exact, except for field names that contain dots);
* ``"missing"``: neither came: ``new`` is None and only the update description tells what
  changed (a delete of the document follows in the stream).

Pre-images (the ``old`` document) exist only on MongoDB 6.0+ for collections created or modified
with ``changeStreamPreAndPostImages: {enabled: true}`` (``db.runCommand({collMod: "tasks",
changeStreamPreAndPostImages: {enabled: true}})``). The feed asks for them with
``fullDocumentBeforeChange: "whenAvailable"`` by default, so it works with and without them (and
falls back silently on servers older than 6.0); ``pre_images="required"`` makes a missing
pre-image an error, ``pre_images=False`` never asks.

Positions are resume tokens as JSON (``{"_data": "8265..."}``). The checkpoint store keeps the
last acknowledged one; a new feed resumes with ``resume_after``. Nothing is kept on the server,
so a feed with the default in-memory checkpoint starts from "now" after a process restart: give
a `FileCheckpoint` (the CLI's ``--checkpoint``) to resume across restarts. Within one process,
a reconnect resumes from the last token the stream reported (it covers events the server
filtered out and idle periods), as long as every change yielded before was acknowledged.
A token older than the oplog window fails with ChangeStreamHistoryLost: a `ResumeError`, unless
``resync=True``, which re-reads the collection as a snapshot instead.

Snapshot prefeed (``prefeed="snapshot"``, when the checkpoint holds no position): the feed opens
the change stream first (the server gives it a resume token for "now"), then reads the
collection with ``find()`` and emits each document as a snapshot INSERT, then iterates the
stream it opened. The read is not a single point-in-time snapshot (MongoDB has no cheap way to
pin one for a long read): a document changed during the read may be read in its new state and
its change is delivered again by the stream. Delivery is at least once and converges by
``_id``. Snapshot positions are ``{"_data": <token of the stream's start>, "snapshot": n}``;
the last one adds ``"done": true``; a feed restarted before the last one was acknowledged takes
the snapshot again.

Differences from PostgreSQL: change streams need a replica set (a single-node one is enough:
``mongod --replSet rs0`` then ``rs.initiate()``; the docker-compose file runs one); watching a
collection that does not exist is allowed (a warning is logged); there is no slot to drop:
the server keeps history only as long as its oplog does.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timezone
from typing import Any
from urllib.parse import unquote, urlsplit

import pymongo
import pymongo.errors
from bson import Binary
from pymongo.collection import Collection
from pymongo.database import Database

from changefeed.change import ALL, Change, Operation, Position
from changefeed.errors import (
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    TransientBackendError,
    first_line,
)
from changefeed.feed import ChangeFeed
from changefeed.registry import register_backend

log = logging.getLogger("changefeed.mongodb")

ENDING_TYPES = ("invalidate", "drop", "rename", "dropDatabase")
"""Event types that end a collection's change stream; always selected by the server match."""

_OPERATIONS = {
    "insert": Operation.INSERT,
    "update": Operation.UPDATE,
    "replace": Operation.UPDATE,
    "delete": Operation.DELETE,
}

# Server error codes (src/mongo/base/error_codes.yml).
RESUMABLE_CODES = frozenset({
    6,  # HostUnreachable
    7,  # HostNotFound
    43,  # CursorNotFound: the cursor was killed; resume with the token
    63,  # StaleShardVersion
    89,  # NetworkTimeout
    91,  # ShutdownInProgress
    133,  # FailedToSatisfyReadPreference
    150,  # StaleEpoch
    189,  # PrimarySteppedDown
    234,  # RetryChangeStream
    262,  # ExceededTimeLimit
    9001,  # SocketException
    10107,  # NotWritablePrimary
    11600,  # InterruptedAtShutdown
    11602,  # InterruptedDueToReplStateChange
    13388,  # StaleConfig
    13435,  # NotPrimaryNoSecondaryOk
    13436,  # NotPrimaryOrSecondary
    # Not in the server's resumable list, but safe to resume from the token: an operator (or
    # a test) killed the stream's getMore (killOp) or its cursor (killCursors while in use).
    237,  # CursorKilled
    11601,  # Interrupted
})
UNAUTHORIZED = 13
AUTHENTICATION_FAILED = 18
INVALID_RESUME_TOKEN = 260
CHANGE_STREAM_FATAL = 280
CHANGE_STREAM_HISTORY_LOST = 286
NOT_A_REPLICA_SET = 40573
_UNKNOWN_FIELD = 40415  # e.g. fullDocumentBeforeChange on a server older than 6.0
_STARTS = {
    "": "from now",
    "resume_after": "after the saved resume token",
    "start_after": "after the end of its previous stream",
}


# -- the pure part: events to changes ----------------------------------------------------------


@dataclass(frozen=True)
class StreamEnded:
    """What `decode_event` returns for an event that ends the change stream.

    ``reason`` is the event's ``operationType``; ``message`` one line for humans; ``position``
    the event's resume token. ``final`` is True for ``invalidate``, the stream's very last
    event (``drop``, ``rename`` and ``dropDatabase`` of the watched collection precede one).
    """

    reason: str
    message: str
    position: Position = None

    @property
    def final(self) -> bool:
        return self.reason == "invalidate"


def operation_types(operation: int) -> list[str]:
    """The ``operationType`` values to ask the server for, for an `Operation` mask.

    The events that end a stream (invalidate, drop, rename, dropDatabase) are always included,
    so a feed notices its end.
    """
    operation = Operation(operation)
    types: list[str] = []
    if operation & Operation.INSERT:
        types.append("insert")
    if operation & Operation.UPDATE:
        types += ["update", "replace"]
    if operation & Operation.DELETE:
        types.append("delete")
    return types + list(ENDING_TYPES)


def token_position(token: Mapping[str, Any]) -> Position:
    """A resume token as a JSON-serialisable position (``{"_data": "8265..."}``)."""
    data = token.get("_data")
    if len(token) == 1 and isinstance(data, str):
        return {"_data": data}
    # Pre-4.2 tokens (BinData _data, _typeBits): keep them as canonical Extended JSON.
    from bson import json_util

    return {"ejson": json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS)}


def position_token(position: Mapping[str, Any]) -> dict[str, Any]:
    """The resume token of a position made by `token_position` (extra keys are dropped)."""
    if "ejson" in position:
        from bson import json_util

        return dict(json_util.loads(position["ejson"]))
    data = position.get("_data")
    if not isinstance(data, str):
        raise ConfigurationError(
            f"the checkpoint holds {position!r}, which is not a MongoDB resume token"
        )
    return {"_data": data}


def decode_event(
    event: Mapping[str, Any], table: str, *, full_document: str | None = "updateLookup"
) -> Change | StreamEnded | None:
    """Turn one change event document into a `Change`, a `StreamEnded`, or None (skipped).

    ``table`` names the watched collection for events without a namespace (invalidate).
    ``full_document`` is the option the stream was opened with: it tells whether an update's
    ``fullDocument`` was looked up later ("updateLookup") or is a post-image. Pure: no I/O.
    """
    kind = event.get("operationType")
    ns = event.get("ns")
    if ns:
        coll = ns.get("coll")
        table = f"{ns.get('db')}.{coll}" if coll is not None else table
    token = event.get("_id")
    position = token_position(token) if token is not None else None

    operation = _OPERATIONS.get(kind)
    if operation is None:
        if kind in ENDING_TYPES:
            return StreamEnded(kind, _ending_message(kind, table, event), position)
        log.debug("skipping a %r event on %s", kind, table)
        return None

    key = event.get("documentKey")
    wall_time = event.get("wallTime")
    if wall_time is not None:
        committed_at = wall_time if wall_time.tzinfo else wall_time.replace(tzinfo=timezone.utc)
    else:
        cluster_time = event.get("clusterTime")
        committed_at = cluster_time.as_datetime() if cluster_time is not None else None
    transaction = _transaction(event) if "txnNumber" in event else None
    before = event.get("fullDocumentBeforeChange")
    if operation is Operation.INSERT:
        return Change(
            operation, table, event.get("fullDocument"), None, key, position, committed_at,
            transaction,
        )
    if operation is Operation.DELETE:
        old = before if before is not None else key
        return Change(operation, table, None, old, key, position, committed_at, transaction)

    new = event.get("fullDocument")
    old = before if before is not None else key
    meta: dict[str, Any] | None = None
    if kind == "update":
        description = _update_description(event.get("updateDescription") or {})
        if new is not None:
            source = "lookup" if full_document == "updateLookup" else "post-image"
        elif before is not None:
            new = apply_update(before, description)
            source = "pre-image+update"
        else:
            source = "missing"
        meta = {"update_description": description, "new_source": source}
    return Change(operation, table, new, old, key, position, committed_at, transaction, False, meta)


def snapshot_change(document: dict[str, Any], table: str, position: Position) -> Change:
    """A document read by the snapshot prefeed, as a snapshot INSERT."""
    return Change(
        Operation.INSERT, table, document, None, {"_id": document.get("_id")}, position,
        None, None, True,
    )


def apply_update(document: Mapping[str, Any], description: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with an update description applied (truncations, then sets, then unsets).

    Paths are dotted; a numeric part indexes an array. Field names containing dots cannot be
    told apart from paths here (MongoDB reports them only with showExpandedEvents).
    """
    result = copy.deepcopy(dict(document))
    for truncated in description.get("truncated_arrays") or ():
        parent, last = _walk(result, truncated["field"])
        array = _child(parent, last)
        if isinstance(array, list):
            del array[truncated["newSize"]:]
    for path, value in (description.get("updated_fields") or {}).items():
        parent, last = _walk(result, path, create=True)
        if isinstance(parent, list):
            index = int(last)
            parent.extend([None] * (index + 1 - len(parent)))
            parent[index] = value
        elif isinstance(parent, dict):
            parent[last] = value
    for path in description.get("removed_fields") or ():
        parent, last = _walk(result, path)
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            parent[int(last)] = None  # $unset of an array element leaves null
    return result


def _walk(document: dict[str, Any], path: str, *, create: bool = False) -> tuple[Any, str]:
    parts = path.split(".")
    node: Any = document
    for part in parts[:-1]:
        child = _child(node, part)
        if child is None and create and isinstance(node, dict):
            child = node[part] = {}
        node = child
        if node is None:
            break
    return node, parts[-1]


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _update_description(description: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "updated_fields": dict(description.get("updatedFields") or {}),
        "removed_fields": list(description.get("removedFields") or []),
        "truncated_arrays": [dict(t) for t in description.get("truncatedArrays") or []],
    }


def _transaction(event: Mapping[str, Any]) -> str:
    lsid = event.get("lsid") or {}
    session = lsid.get("id")
    if isinstance(session, Binary) and session.subtype in (3, 4):
        session = session.as_uuid(session.subtype)
    return f"{session}:{int(event['txnNumber'])}"


def _ending_message(kind: str, table: str, event: Mapping[str, Any]) -> str:
    if kind == "drop":
        return f"collection {table} was dropped; the change stream ended"
    if kind == "rename":
        to = event.get("to") or {}
        target = f"{to.get('db')}.{to.get('coll')}"
        return (
            f"collection {table} was renamed to {target}; the change stream ended"
            f" (watch {target} to follow it)"
        )
    if kind == "dropDatabase":
        database = (event.get("ns") or {}).get("db") or table.partition(".")[0]
        return f"database {database} was dropped; the change stream ended"
    return (
        f"the change stream of {table} was invalidated (its collection was dropped or renamed);"
        " the change stream ended"
    )


# -- errors --------------------------------------------------------------------------------------


def classify_error(exc: BaseException, *, table: str = "the collection",
                   server: str = "the server") -> ChangefeedError | None:
    """The changefeed error, with a clear one-line message, for a pymongo error (else None).

    Pure: transient errors become `TransientBackendError`, the rest permanent ones.
    """
    errors = pymongo.errors
    if isinstance(exc, ChangefeedError):
        return exc
    if not isinstance(exc, errors.PyMongoError):
        return None
    if isinstance(exc, errors.ConfigurationError):
        return ConfigurationError(f"bad MongoDB URL or option: {first_line(exc)}")
    if isinstance(exc, errors.ServerSelectionTimeoutError):
        reason = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
        return TransientBackendError(f"cannot reach MongoDB at {server}: {_one_line(reason)}")
    if isinstance(exc, errors.ConnectionFailure):  # AutoReconnect, NetworkTimeout, NotPrimary
        return TransientBackendError(f"connection to MongoDB lost: {first_line(exc)}")
    if not isinstance(exc, errors.OperationFailure):
        if exc.has_error_label("ResumableChangeStreamError"):
            return TransientBackendError(f"MongoDB: {first_line(exc)}")
        return None
    code = exc.code
    text = _server_message(exc)
    if code == CHANGE_STREAM_HISTORY_LOST:
        return ResumeError(
            f"the saved resume token of {table} is older than the oldest change in the oplog"
            " (ChangeStreamHistoryLost): changes were lost; delete the checkpoint and restart"
            " with --prefeed snapshot, or pass resync=True to re-read the collection"
        )
    if code == INVALID_RESUME_TOKEN:
        return ResumeError(
            f"the saved resume token of {table} is not valid on {server} ({text}): was the"
            " checkpoint made for another cluster? delete it and restart with --prefeed snapshot"
        )
    if code == NOT_A_REPLICA_SET or "only supported on replica sets" in text:
        return PermanentBackendError(
            f"change streams need a replica set, but MongoDB at {server} is a standalone server:"
            " start it as a single-node replica set (docker compose up -d mongodb, or run mongod"
            " --replSet rs0 and then rs.initiate() in mongosh)"
        )
    if code == UNAUTHORIZED:
        return PermanentBackendError(
            f"not authorized to watch {table} ({text}): the user needs the find and changeStream"
            " actions on it (e.g. the read role on its database)"
        )
    if code == AUTHENTICATION_FAILED:
        return PermanentBackendError(
            f"authentication to MongoDB at {server} failed: check the user, password and"
            " authSource in the URL"
        )
    if code == CHANGE_STREAM_FATAL or exc.has_error_label("NonResumableChangeStreamError"):
        return PermanentBackendError(f"the change stream of {table} failed for good: {text}")
    if code in RESUMABLE_CODES or exc.has_error_label("ResumableChangeStreamError"):
        return TransientBackendError(f"MongoDB {_code_name(exc)}: {text}")
    return PermanentBackendError(f"MongoDB error {_code_name(exc)}: {text}")


def is_transient_error(exc: BaseException) -> bool:
    """Whether reconnecting may cure ``exc`` (a pymongo or changefeed error). Pure."""
    return isinstance(classify_error(exc), TransientBackendError)


def _server_message(exc: pymongo.errors.OperationFailure) -> str:
    details = exc.details or {}
    message = details.get("errmsg") or str(exc).split(", full error:")[0]
    return _one_line(str(message))


def _code_name(exc: pymongo.errors.OperationFailure) -> str:
    name = (exc.details or {}).get("codeName")
    return f"{exc.code} {name}" if name else str(exc.code)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


# -- the feed ------------------------------------------------------------------------------------


class MongoChangeFeed(ChangeFeed):
    """Changes of one MongoDB collection, through a change stream (see the module docstring).

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
        snapshot_batch: documents per batch while reading the snapshot.
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
        snapshot_batch: int = 1000,
        client_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if pre_images not in (None, False, "whenAvailable", "required", "off"):
            raise ConfigurationError(
                f"unknown pre_images {pre_images!r}: use 'whenAvailable', 'required' or False"
            )
        if full_document not in (None, "default", "updateLookup", "whenAvailable", "required"):
            raise ConfigurationError(
                f"unknown full_document {full_document!r}: use 'updateLookup', 'whenAvailable',"
                " 'required' or None"
            )
        self._url: str | None = None
        self._client: Any = None
        self._owns_client = False
        self._collection: Any = None
        database_name, collection_name = _resolve(table, connection, database)
        if isinstance(connection, str):
            self._url = connection
        elif isinstance(connection, Collection):
            self._collection = connection
            self._client = connection.database.client
        elif isinstance(connection, Database):
            self._client = connection.client
        elif isinstance(connection, pymongo.MongoClient):
            self._client = connection
        elif hasattr(connection, "watch") and hasattr(connection, "find"):
            self._collection = connection  # collection-like (tests use a fake at this boundary)
        elif connection is None:
            raise ConfigurationError("no MongoDB connection given: pass a mongodb:// URL")
        else:
            raise ConfigurationError(
                f"cannot use a {type(connection).__name__} as a MongoDB connection: pass a"
                " mongodb:// URL, a MongoClient, a Database or a Collection"
            )
        self.database_name = database_name
        self.collection_name = collection_name
        super().__init__(
            f"{database_name}.{collection_name}", operation, prefeed=prefeed,
            connection=connection, **options,
        )
        self.full_document = None if full_document == "default" else full_document
        self.pre_images = "off" if pre_images is False else pre_images
        self.resync = resync
        self.max_await_ms = max_await_ms
        self.snapshot_batch = snapshot_batch
        self.client_options = dict(client_options or {})
        self.ended: StreamEnded | None = None
        """Set when the stream ended (collection dropped or renamed, ...): why."""
        self._pre_images_supported = True
        self._checked = False
        # In-process resume state: the latest token the stream reported, and the position of
        # the last change yielded. While that change is acknowledged, resuming from the latest
        # token skips nothing the consumer has not seen.
        self._latest: tuple[str, dict[str, Any]] | None = None
        self._yielded: Position = self.acknowledged

    # -- the stream ----------------------------------------------------------------------------

    def run_changefeed(self) -> Iterator[Change | None]:
        self.ended = None
        try:
            collection = self._get_collection()
            if not self._checked:
                self._check_collection(collection)
                self._checked = True
                self.mark_connected()
            start, snapshot = self._start()
            while True:
                try:
                    yield from self._stream(collection, start, snapshot)
                    return
                except pymongo.errors.OperationFailure as exc:
                    if exc.code != CHANGE_STREAM_HISTORY_LOST or not self.resync:
                        raise
                    log.warning(
                        "the resume token of %s is older than the oplog: re-reading the"
                        " collection (resync)", self.table,
                    )
                    self._latest = None
                    start, snapshot = {}, True
        except pymongo.errors.PyMongoError as exc:
            error = classify_error(exc, table=self.table, server=self._server())
            if not self._checked and isinstance(error, TransientBackendError):
                # Never reached the server: most likely a wrong URL or a server that is down.
                # Say so and stop, as the PostgreSQL backend does, instead of retrying forever.
                error = PermanentBackendError(error.message)
            raise (error or PermanentBackendError(first_line(exc))) from exc

    def _start(self) -> tuple[dict[str, Any], bool]:
        """The watch() arguments to start with, and whether to take the snapshot first."""
        acknowledged = self.acknowledged
        if self._latest is not None and acknowledged == self._yielded:
            kind, token = self._latest
            return {kind: token}, False
        if acknowledged is None:
            return {}, self.prefeed == "snapshot"
        if not isinstance(acknowledged, Mapping):
            raise ConfigurationError(
                f"the checkpoint of {self.feed_id} holds {acknowledged!r}, which is not a"
                " MongoDB resume token: delete it or give another feed name"
            )
        unfinished = "snapshot" in acknowledged and not acknowledged.get("done")
        if unfinished and (self.prefeed == "snapshot" or "_data" not in acknowledged):
            log.info("the snapshot of %s was not completed: taking it again", self.table)
            return {}, True
        if "_data" not in acknowledged and "ejson" not in acknowledged:
            return {}, self.prefeed == "snapshot"
        return {"resume_after": position_token(acknowledged)}, False

    def _stream(
        self, collection: Any, start: dict[str, Any], snapshot: bool
    ) -> Iterator[Change | None]:
        stream = self._watch(collection, start)
        # Until the stream moves past it, a start_after token must be used as such again.
        start_after = start.get("start_after")
        try:
            opened_at = stream.resume_token
            if opened_at is not None:
                self._remember(opened_at, start_after)
            log.info("watching %s %s", self.table, _STARTS[next(iter(start), "")])
            if snapshot:
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
                    self._remember(token, start_after)
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
                self._latest = ("start_after", dict(event["_id"]))
                self.ended = ending or result
                self.stats.extra["ended"] = self.ended.message
                log.warning("%s", self.ended.message)
                return
        finally:
            try:
                stream.close()
            except pymongo.errors.PyMongoError:
                pass

    def _remember(self, token: Mapping[str, Any], start_after: Any) -> None:
        kind = "start_after" if start_after is not None and token == start_after else "resume_after"
        self._latest = (kind, dict(token))

    def _watch(self, collection: Any, start: dict[str, Any]) -> Any:
        options: dict[str, Any] = {
            "pipeline": [{"$match": {"operationType": {"$in": operation_types(self.operation)}}}],
            "max_await_time_ms": self.max_await_ms,
            **start,
        }
        if self.full_document is not None:
            options["full_document"] = self.full_document
        auto = self.pre_images is None
        if self.pre_images != "off" and self._pre_images_supported:
            options["full_document_before_change"] = "whenAvailable" if auto else self.pre_images
        try:
            return collection.watch(**options)
        except pymongo.errors.OperationFailure as exc:
            if not (auto and "full_document_before_change" in options
                    and (exc.code == _UNKNOWN_FIELD or "fullDocumentBeforeChange" in str(exc))):
                raise
            log.info("MongoDB at %s has no pre-images (6.0+): old documents hold keys only",
                     self._server())
            self._pre_images_supported = False
            del options["full_document_before_change"]
            return collection.watch(**options)

    def _read_snapshot(self, collection: Any, opened_at: Any) -> Iterator[Change | None]:
        """Every document of the collection as a snapshot insert, one behind the read, so the
        last one can say the snapshot is done."""
        base = token_position(opened_at) if opened_at is not None else {}
        table = self.table
        previous: Change | None = None
        count = 0
        log.info("snapshot of %s: reading", table)
        for document in collection.find(batch_size=self.snapshot_batch):
            count += 1
            change = snapshot_change(document, table, {**base, "snapshot": count})
            if previous is not None:
                self._yielded = previous.position
                yield previous
            previous = change
        log.info("snapshot of %s: %s documents", table, f"{count:,}")
        if previous is not None:
            last = snapshot_change(previous.new or {}, table, {**base, "snapshot": count,
                                                                "done": True})
            self._yielded = last.position
            yield last

    # -- acknowledgement -----------------------------------------------------------------------

    def on_acknowledge(self, position: Position) -> None:
        """Nothing to tell the server: the checkpoint store keeps the resume token."""

    # -- connections ---------------------------------------------------------------------------

    def _get_collection(self) -> Any:
        if self._collection is not None:
            return self._collection
        if self._client is None:
            self._client = self._make_client()
            self._owns_client = True
        return self._client[self.database_name][self.collection_name]

    def _make_client(self) -> Any:
        options: dict[str, Any] = {"tz_aware": True, "appname": "changefeed"}
        if "serverselectiontimeoutms" not in (self._url or "").lower():
            options["serverSelectionTimeoutMS"] = 5000
        options.update(self.client_options)
        try:
            return pymongo.MongoClient(self._url, **options)
        except (pymongo.errors.ConfigurationError, ValueError) as exc:  # InvalidURI, bad port
            raise ConfigurationError(f"bad MongoDB URL: {first_line(exc)}") from exc

    def _check_collection(self, collection: Any) -> None:
        """Warn about a collection that does not exist (watching it is allowed)."""
        try:
            names = collection.database.list_collection_names(filter={"name": collection.name})
        except pymongo.errors.OperationFailure as exc:  # e.g. no listCollections privilege
            log.debug("cannot list the collections of %s: %s", self.database_name, exc)
            return
        if collection.name not in names:
            log.warning("collection %s does not exist (yet); watching it anyway", self.table)

    def _server(self) -> str:
        if self._url is not None:
            netloc = urlsplit(self._url).netloc
            return unquote(netloc.rpartition("@")[2]) or "localhost:27017"
        try:
            seeds = self._client.topology_description.server_descriptions()
            return ",".join(f"{host}:{port}" for host, port in seeds) or "the server"
        except Exception:
            return "the server"

    def close(self) -> None:
        """Close the client if the feed made it from a URL; a client passed in stays open."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None
            self._owns_client = False

    # -- errors --------------------------------------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        """Lost connections, elections, killed cursors and other resumable server errors."""
        return is_transient_error(exc)

    def __repr__(self) -> str:
        return f"MongoChangeFeed({self.table!r}, {self.operation!r})"


def _resolve(table: str, connection: Any, database: str | None) -> tuple[str, str]:
    """(database, collection) for a table name and a connection."""
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


# -- registration --------------------------------------------------------------------------------


register_backend(
    "mongodb", MongoChangeFeed, connection_types=[pymongo.MongoClient, Database, Collection]
)


__all__ = [
    "ENDING_TYPES",
    "MongoChangeFeed",
    "StreamEnded",
    "apply_update",
    "classify_error",
    "decode_event",
    "is_transient_error",
    "operation_types",
    "position_token",
    "snapshot_change",
    "token_position",
]
