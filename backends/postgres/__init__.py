"""PostgreSQL logical replication (psycopg 3, pgoutput). See `feed` for the design notes."""

from changefeed.backends.postgres.feed import PostgresChangeFeed, feed_from_url, slot_name_for
from changefeed.backends.postgres.pgoutput import PgOutputDecoder

__all__ = ["PgOutputDecoder", "PostgresChangeFeed", "feed_from_url", "slot_name_for"]
