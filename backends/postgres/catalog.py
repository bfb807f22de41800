"""What a PostgreSQL feed reads and writes of publications in the server's catalog.

Functions of an open (non-replication, autocommit) connection, without state. They enforce the
rules whose breach loses changes or breaks the application (replica identity first, also for
partitions attached later; partitions through their root; no shared publication) and keep the
publication's comment (``changefeed {json}``): ARCHITECTURE.md, "Publications"."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from changefeed.backends.postgres.tables import Table
from changefeed.change import Operation
from changefeed.errors import ConfigurationError
from changefeed.formats.json_values import MAX_DEPTH, deeper_than

_META_PREFIX = "changefeed "
_LEGACY_SNAPSHOT = {"changefeed: snapshot pending": "pending", "changefeed: snapshot done": "done"}


def check_replica_identity(
    conn: psycopg.Connection, tables: Sequence[Table], operation: Operation
) -> None:
    """Refuse to publish updates/deletes of a table whose UPDATE/DELETE would then fail.

    PostgreSQL rejects UPDATE and DELETE on a published table (or any partition of one) that
    has no replica identity: no primary key under REPLICA IDENTITY DEFAULT, NOTHING, or an
    identity index that is gone.
    """
    if not operation & (Operation.UPDATE | Operation.DELETE):
        return
    lacking = lacking_identity(conn, tables)
    if lacking:
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        which = ", ".join(lacking[:5]) + more
        ops = " and ".join(f"{name}s" for name in Operation(operation & ~Operation.INSERT).names)
        raise ConfigurationError(
            f"{which} has no replica identity: publishing its {ops} would make the"
            " application's own UPDATE and DELETE on it fail. Add a primary key, or run"
            f" ALTER TABLE {lacking[0]} REPLICA IDENTITY FULL, or stream inserts only with"
            " --ops insert"
        )


IDENTITY_GUARD = "changefeed_replica_identity"
"""The event trigger that gives a partition created or attached under a partitioned table
without a primary key ``REPLICA IDENTITY FULL`` (the README's "Partitioned tables without a
primary key" has it; `IDENTITY_GUARD_SQL`)."""

IDENTITY_GUARD_SQL = """\
CREATE OR REPLACE FUNCTION changefeed_replica_identity() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
  part regclass;
BEGIN
  FOR part IN
    SELECT DISTINCT t.relid::regclass
    FROM pg_event_trigger_ddl_commands() AS d
    CROSS JOIN LATERAL pg_partition_tree(d.objid) AS t
    JOIN pg_class c ON c.oid = t.relid
    WHERE d.classid = 'pg_class'::regclass AND c.relkind = 'r' AND c.relispartition
      AND c.relreplident IN ('d', 'n')
      AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
      AND (SELECT r.relreplident FROM pg_class r
           WHERE r.oid = pg_partition_root(c.oid)) IN ('f', 'i')
  LOOP
    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', part);
  END LOOP;
END $$;
CREATE EVENT TRIGGER changefeed_replica_identity ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
  EXECUTE FUNCTION changefeed_replica_identity();
"""
"""The README's event trigger (`IDENTITY_GUARD`): each new partition whose root has REPLICA
IDENTITY FULL or USING INDEX, and that has no primary key nor identity of its own, gets
REPLICA IDENTITY FULL in the same transaction that created or attached it."""


def check_partition_identity(
    conn: psycopg.Connection, tables: Sequence[Table], operation: Operation
) -> None:
    """Refuse to publish updates/deletes of a partitioned table without a primary key unless
    the database has the `IDENTITY_GUARD` event trigger: a partition created or attached
    later would have no replica identity, and the application's UPDATE/DELETE on it would
    fail while the feed publishes them."""
    if not operation & (Operation.UPDATE | Operation.DELETE):
        return
    partitioned = [table.oid for table in tables if table.kind == "p"]
    if not partitioned:
        return
    rows = conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY(%s)"
        " AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)"
        " AND NOT EXISTS (SELECT 1 FROM pg_event_trigger e WHERE e.evtname = %s"
        "   AND e.evtenabled <> 'D') ORDER BY 1",
        [partitioned, IDENTITY_GUARD],
    ).fetchall()
    if rows:
        ops = " and ".join(f"{name}s" for name in Operation(operation & ~Operation.INSERT).names)
        raise ConfigurationError(
            f"{rows[0][0]} is partitioned without a primary key: a partition created or"
            f" attached later gets no replica identity, and publishing its {ops} would make"
            " the application's UPDATE and DELETE on it fail. Add a primary key to"
            f" {rows[0][0]}, stream --ops insert, or create the event trigger"
            f" {IDENTITY_GUARD} (README: Partitioned tables without a primary key)"
        )


def lacking_identity(
    conn: psycopg.Connection, tables: Sequence[Table]
) -> list[str]:
    """The tables among ``tables`` and their partitions whose UPDATE/DELETE fail while a
    publication publishes them: no replica identity."""
    oids = [table.oid for table in tables]
    rows = conn.execute(  # the tables themselves, and every partition of partitioned ones
        "SELECT format('%%I.%%I', n.nspname, c.relname), c.relreplident,"
        " EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),"
        " EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND (c.oid = ANY(%s) OR c.oid IN (SELECT p.relid"
        "   FROM unnest(%s::oid[]) AS t(oid), pg_partition_tree(t.oid) p WHERE p.isleaf))"
        " ORDER BY 1",
        [oids, oids],
    ).fetchall()
    return [
        name for name, identity, has_key, has_index in rows
        if identity == "n" or (identity == "d" and not has_key)
        or (identity == "i" and not has_index)
    ]


# -- the publication and its metadata --------------------------------------------------------


@dataclass
class Publication:
    """A publication as the catalog shows it, with changefeed's metadata (empty if none)."""

    name: str
    operation: Operation
    truncate: bool
    via_root: bool
    all_tables: bool
    table_oids: frozenset[int]
    meta: dict[str, Any]


def get_publication(conn: psycopg.Connection, name: str) -> Publication | None:
    row = conn.execute(
        "SELECT p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.pubviaroot,"
        " p.puballtables,"
        " array(SELECT prrelid::bigint FROM pg_publication_rel r WHERE r.prpubid = p.oid),"
        " obj_description(p.oid, 'pg_publication')"
        " FROM pg_publication p WHERE p.pubname = %s",
        [name],
    ).fetchone()
    if row is None:
        return None
    operation = Operation(0)
    for flag, on in zip((Operation.INSERT, Operation.UPDATE, Operation.DELETE), row[:3],
                        strict=True):
        if on:
            operation |= flag
    return Publication(
        name, operation, row[3], row[4], row[5], frozenset(row[6]), parse_meta(row[7])
    )


def parse_meta(comment: str | None) -> dict[str, Any]:
    """changefeed's metadata from a publication comment (empty for other comments)."""
    if not comment:
        return {}
    if comment in _LEGACY_SNAPSHOT:
        return {"snapshot": _LEGACY_SNAPSHOT[comment]}
    if comment.startswith(_META_PREFIX):
        text = comment[len(_META_PREFIX):]
        # Ours nests a few levels around values of at most MAX_DEPTH; deeper is not ours (the
        # publication's owner may comment anything) and json.loads would recurse on it.
        if deeper_than(text.encode(), 2 * MAX_DEPTH):
            return {}
        try:
            meta = json.loads(text)
        except ValueError:
            return {}
        return meta if isinstance(meta, dict) else {}
    return {}


def write_meta(conn: psycopg.Connection, publication: str, meta: dict[str, Any]) -> None:
    conn.execute(
        sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
            sql.Identifier(publication),
            sql.Literal(_META_PREFIX + json.dumps(meta, sort_keys=True)),
        )
    )


def changefeed_publications(conn: psycopg.Connection) -> list[Publication]:
    """Every publication carrying changefeed metadata."""
    names = conn.execute(
        "SELECT pubname FROM pg_publication WHERE obj_description(oid, 'pg_publication')"
        " LIKE 'changefeed%%' ORDER BY 1"
    ).fetchall()
    found = [get_publication(conn, name) for (name,) in names]
    return [p for p in found if p is not None and p.meta]


def describe_oids(conn: psycopg.Connection, oids: Sequence[int]) -> str:
    rows = conn.execute(
        "SELECT o::oid::regclass::text FROM unnest(%s::bigint[]) o ORDER BY 1",
        [list(oids)],
    ).fetchall()
    return ", ".join(row[0] for row in rows) or "no table"


def check_publication(
    conn: psycopg.Connection, publication: Publication, tables: Sequence[Table], slot: str,
    operation: Operation,
) -> None:
    """Refuse a publication that serves other tables (unless it is the slot's own: its tables
    then follow the feed's list), or that another slot's feed uses with other operations."""
    wanted = frozenset(table.oid for table in tables)
    if publication.all_tables:
        raise ConfigurationError(
            f"publication {publication.name} is FOR ALL TABLES, not for"
            f" {', '.join(t.qualified for t in tables)}: choose another --publication"
        )
    own = publication.meta.get("slot") == slot
    if publication.table_oids != wanted and not own:
        raise ConfigurationError(
            f"publication {publication.name} serves {describe_oids(conn, publication.table_oids)},"
            f" not {', '.join(t.qualified for t in tables)}: a feed must not share it; choose"
            " another --publication (and --slot)"
        )
    owner = publication.meta.get("slot")
    if owner is not None and owner != slot and publication.operation != operation:
        # Shared by slots, a publication's operations are every sharer's: changing them
        # would silently change what the other feed receives.
        raise ConfigurationError(
            f"publication {publication.name} is shared with slot {owner} and publishes"
            f" {', '.join(publication.operation.names)}, not {', '.join(operation.names)}:"
            " choose another --publication"
        )


def check_slot_owner(
    conn: psycopg.Connection, slot: str, publication: str, tables: Sequence[Table]
) -> None:
    """Refuse a slot that changefeed recorded as serving another publication's tables."""
    wanted = frozenset(table.oid for table in tables)
    for other in changefeed_publications(conn):
        if (other.name != publication and other.meta.get("slot") == slot
                and other.table_oids != wanted):
            raise ConfigurationError(
                f"slot {slot} serves publication {other.name}"
                f" ({describe_oids(conn, other.table_oids)}), not"
                f" {', '.join(t.qualified for t in tables)}: choose another --slot"
            )


def find_default_slot(
    conn: psycopg.Connection, tables: Sequence[Table], candidates: Sequence[str]
) -> tuple[str, str] | None:
    """An existing default-named (slot, publication) serving exactly ``tables``.

    Found by table OIDs, so a feed restarted under a table's new name continues the slot it
    had (``candidates`` are legacy default names, adopted when they serve the same tables).
    """
    wanted = frozenset(table.oid for table in tables)
    slots = {row[0] for row in conn.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        " AND plugin = 'pgoutput'"
    )}
    for publication in changefeed_publications(conn):
        slot = publication.meta.get("slot")
        if publication.meta.get("default") and slot in slots and publication.table_oids == wanted:
            return slot, publication.name
    for name in candidates:  # made by an earlier version: slot and publication share the name
        publication = get_publication(conn, name)
        if name in slots and publication is not None and publication.table_oids == wanted:
            return name, name
    return None


def _publish(operation: Operation) -> str:
    """The ``publish`` list: the feed's operations, and truncate, which the feed reports (it
    cannot make the application's TRUNCATE fail, and a silent TRUNCATE would hide a gap)."""
    return ", ".join([*operation.names, "truncate"])


def create_publication(
    conn: psycopg.Connection, name: str, tables: Sequence[Table], operation: Operation,
    meta: dict[str, Any],
) -> None:
    conn.execute(
        sql.SQL(
            "CREATE PUBLICATION {} FOR TABLE {}"
            " WITH (publish = {}, publish_via_partition_root = true)"
        ).format(
            sql.Identifier(name),
            sql.SQL(", ").join(table.identifier for table in tables),
            sql.Literal(_publish(operation)),
        )
    )
    write_meta(conn, name, meta)


def update_publication(
    conn: psycopg.Connection, publication: Publication, operation: Operation
) -> None:
    """Publish exactly ``operation`` (and truncate), through partition roots."""
    ident = sql.Identifier(publication.name)
    if publication.operation != operation or not publication.truncate:
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(
            ident, sql.Literal(_publish(operation))))
    if not publication.via_root:
        conn.execute(sql.SQL(
            "ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(ident))


def set_publication_tables(
    conn: psycopg.Connection, publication: Publication, tables: Sequence[Table]
) -> tuple[list[Table], list[int]]:
    """Make ``publication`` publish exactly ``tables``; returns (added tables, removed OIDs)."""
    ident = sql.Identifier(publication.name)
    added = [table for table in tables if table.oid not in publication.table_oids]
    removed = sorted(publication.table_oids - {table.oid for table in tables})
    if added:
        conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
            ident, sql.SQL(", ").join(table.identifier for table in added)))
    if removed:
        conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
            ident, sql.SQL(", ").join(sql.SQL(oid_name) for oid_name in
                                      _qualified_names(conn, removed))))
    return added, removed


def add_publication_tables(conn: psycopg.Connection, name: str, tables: Sequence[Table]) -> None:
    conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
        sql.Identifier(name), sql.SQL(", ").join(table.identifier for table in tables)))


def _qualified_names(conn: psycopg.Connection, oids: Sequence[int]) -> list[str]:
    rows = conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY(%s)", [list(oids)]
    ).fetchall()
    return [row[0] for row in rows]


def drop_publication(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
