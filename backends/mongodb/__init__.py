"""The MongoDB backend: change streams (``Collection.watch()``) through pymongo.

Change events become `Change` items (``insert``, ``update``/``replace``, ``delete``; the events
that end a stream end the feed with one line); positions are resume tokens, kept by the
checkpoint store (give a `FileCheckpoint` to resume across restarts); ``prefeed="snapshot"``
opens the stream first, then reads the collection. How events map, where an update's ``new``
comes from (``meta["new_source"]``) and what pre-images need: ARCHITECTURE.md, "MongoDB".

The package: `events` (pure: event documents to changes), `positions` (pure: resume tokens),
`errors` (pure: pymongo errors classified), `connection` (clients, watch() options) and `feed`
(`MongoChangeFeed`, the I/O loop).
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
