"""PostgreSQL logical replication (psycopg 3, pgoutput). See `feed` for the design notes."""

from changefeed.backends.postgres.feed import PostgresChangeFeed, slot_name_for
from changefeed.backends.postgres.pgoutput import PgOutputDecoder

__all__ = ["PgOutputDecoder", "PostgresChangeFeed", "slot_name_for"]
