"""RethinkDB changefeeds: ``table.changes()`` through the official ``rethinkdb`` driver.

The package: `events` decodes changefeed documents and keeps the re-read bookkeeping (pure),
`errors` classifies the driver's errors (pure), `connection` parses URLs and sends the queries,
`feed` is the thin `RethinkChangeFeed` loop. Importing the package registers the backend.

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

import rethinkdb.net

from changefeed.backends.rethinkdb.connection import ConnectionParams
from changefeed.backends.rethinkdb.errors import is_transient_error
from changefeed.backends.rethinkdb.events import State, decode_change, make_position
from changefeed.backends.rethinkdb.feed import RethinkChangeFeed
from changefeed.registry import register_backend

register_backend(
    "rethinkdb", RethinkChangeFeed, connection_types=[rethinkdb.net.DefaultConnection]
)

__all__ = [
    "ConnectionParams",
    "RethinkChangeFeed",
    "State",
    "decode_change",
    "is_transient_error",
    "make_position",
]
