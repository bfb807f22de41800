"""``changefeed backfill``: asking the feed of a slot to back-fill tables, through the slot.

The request is a logical decoding message (`chunks.BACKFILL_PREFIX`), so a running feed starts
at once and a stopped one when it next reads (`Backfills` takes it from the stream).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import psycopg

from changefeed.backends.postgres import catalog, names, slots
from changefeed.backends.postgres.chunks import BACKFILL_PREFIX
from changefeed.backends.postgres.tables import Table, resolve_tables
from changefeed.errors import ConfigurationError


def request_backfill(conn: psycopg.Connection, slot: str, tables: Sequence[Table]) -> list[str]:
    """Ask the feed of ``slot`` to back-fill ``tables``: the request goes through the slot,
    so a running feed starts at once and a stopped one when it next reads. Returns the
    tables' names."""
    if slots.get_slot(conn, slot) is None:
        raise ConfigurationError(f"no replication slot named {slot!r} in this database")
    publications = [p for p in catalog.changefeed_publications(conn) if p.meta.get("slot") == slot]
    published = frozenset().union(*(p.table_oids for p in publications)) if publications else None
    for table in tables:
        if published is not None and table.oid not in published:
            raise ConfigurationError(f"slot {slot} does not stream {table.qualified}")
    content = json.dumps({"slot": slot, "tables": [table.oid for table in tables]})
    conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", [BACKFILL_PREFIX, content])
    return [table.qualified for table in tables]


def request_backfills(url: str, slot: str, tables: Sequence[str]) -> list[str]:
    """`request_backfill` for ``changefeed backfill``: a URL, and table names or patterns as
    given on the command line; returns the tables' names."""
    parsed = [names.parse_table_name(t) for name in tables for t in names.split_tables(name)]
    with slots.connect(url) as conn:
        return request_backfill(conn, names.check_slot_name(slot), resolve_tables(conn, parsed))
