"""The MongoDB backend: change streams (``Collection.watch()``) through pymongo.

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

The package: `events` (pure: event documents to changes, update descriptions applied),
`positions` (pure: resume tokens as positions, where a stream starts), `errors` (pure: pymongo
errors classified by server code and label), `connection` (names, clients, watch() options)
and `feed` (`MongoChangeFeed`, the I/O loop).
"""

from changefeed.backends.mongodb.errors import classify_error, is_transient_error
from changefeed.backends.mongodb.events import (
    ENDING_TYPES,
    StreamEnded,
    apply_update,
    decode_event,
    operation_types,
    snapshot_change,
)
from changefeed.backends.mongodb.feed import MongoChangeFeed
from changefeed.backends.mongodb.positions import position_token, token_position

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
