"""Sync for app clients: Electric's shape API and Mobync's sync protocol over a shape log.

``changefeed serve --url URL TABLE... [--app MODULE:OBJECT] [--owner-column COLUMN]`` serves
the tables through `SyncService`:

* ``GET /v1/shape`` (`electric`): Electric's HTTP shape API, so ``@electric-sql/client``
  syncs shapes (a table, a ``where``, columns: `shapes`, the ``where`` compiler: `where`) unchanged;
* ``POST /sync`` (`mobync`): Mobync's protocol, writes made safe by the application's
  validators and the owner rule (`application`);
* ``/static/changefeed-sync.js``: a small client keeping a local store and an offline queue.

Both read the shape log (`log`, `tail`): every change of the served tables, fed by the feed
with acknowledged delivery into PostgreSQL, numbered (the offsets and logical clocks), kept and
compacted per key, so clients resume where they stopped, also after restarts.
"""

from changefeed.serve.sync.core import Settings
from changefeed.serve.sync.service import SyncService

__all__ = ["Settings", "SyncService"]
