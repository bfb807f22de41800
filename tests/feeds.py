"""Feeds for the tests: a retry quick enough for a test, and PostgreSQL feeds made, started and
drained the same way in every file that needs one."""

from __future__ import annotations

from typing import Any

from changefeed import ALL, Change, Operation, Retry
from changefeed.backends.postgres import PostgresChangeFeed

FAST_RETRY = Retry(initial=0.05, maximum=0.5)
"""Reconnects within half a second: a test waits for the server, not for a backoff."""


def make_feed(dsn: str, table: str = "tasks", operation: Operation = ALL,
              **options: Any) -> PostgresChangeFeed:
    """A PostgreSQL feed of ``table`` on ``dsn``, retrying with `FAST_RETRY` unless told."""
    options.setdefault("retry", FAST_RETRY)
    return PostgresChangeFeed(table, operation, connection=dsn, **options)


def start(feed: PostgresChangeFeed) -> None:
    """Create the slot (and publication) now, so later writes are streamed."""
    assert list(feed.changes(timeout=0.2)) == []


def drain(feed: Any, *, idle: float = 0.5, timeout: float = 20.0, ack: bool = True,
          close: bool = False) -> list[Change]:
    """Every change until the feed is idle for ``idle`` seconds, each acknowledged unless not
    ``ack``; the feed closed after if ``close``.

    A PostgreSQL feed is idle only once caught up with the server's WAL as it was when the
    feed went quiet (`IdleCheck`): everything committed before the call is read whatever
    ``idle`` is, so a short one is enough; a longer one only waits for writes still to come."""
    got = []
    for change in feed.changes(idle_timeout=idle, timeout=timeout):
        got.append(change)
        if ack:
            feed.ack(change.position)
    if close:
        feed.close()
    return got
