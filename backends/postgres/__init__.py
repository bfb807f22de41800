"""PostgreSQL logical replication (psycopg 3, pgoutput).

Where each job lives:

* `feed`: `PostgresChangeFeed`, set-up and what the consumer drives (importing it registers
  the backend); `streaming`: its stream loop; `ddl`: its answers to the application's DDL;
* `stream`: every read of the replication socket, and the rest of the walsender conversation
  (status updates, keepalives, read-ahead, the end);
* `connection`: connecting, and the server's checks;
* `tables`, `publication`, `slots`, `catalog`, `names`: what is resolved and prepared on the
  server (the watched tables, the publication, the slot, their catalog records, their names);
* `snapshot`: the exported snapshot, read when the slot is created;
* `backfill` (I/O) and `chunks` (pure): the snapshot in key chunks beside the stream;
* `protocol`, `pgoutput`, `tuples`, `loading`, `values`: bytes to changes, pure;
* `position`: `PgPosition`, where a change sits in the stream, pure;
* `ledger`: which WAL position the slot may confirm, pure;
* `errors`: what a failure means (retry or stop, and the message), pure;
* `drain`: the deploy gate (``changefeed drain``).
"""

from changefeed.backends.postgres.feed import PostgresChangeFeed
from changefeed.backends.postgres.names import slot_name_for
from changefeed.backends.postgres.pgoutput import PgOutputDecoder

__all__ = ["PgOutputDecoder", "PostgresChangeFeed", "slot_name_for"]
