"""What the application's DDL does to a feed's tables, noticed between reads of the stream.

PostgreSQL's stream says nothing of these, yet each changes which rows a table holds or under
which name its changes arrive. A feed compares the catalog with what it knows (at its start,
with what the publication's record remembers; while it runs, every `CHECK_SECONDS`):

* **a partition created or attached** under a watched partitioned table: an attached table's
  rows, and rows changed while a partition was detached, never went through the stream as the
  root's changes: the feed back-fills the partition (its rows as snapshot inserts of the root);
* **a partition detached or dropped**: its rows are no longer the root's, and PostgreSQL writes
  no delete for them: said in one line (a consumer must drop them itself);
* **a table newly matching a pattern** (``app.*``): added to the publication and back-filled;
* **a table renamed** with no change since (pgoutput describes a table again only before its
  next change) or whose **schema was renamed** (pgoutput does not describe it again at all): its
  changes carry the new name once the stream has read as far as the WAL went when this was
  noticed (changes from before the rename keep the old name), said in one line; the changes
  committed between the rename and then carry the old one;
* **a partition without a replica identity** under a watched table: the application's UPDATE
  and DELETE on it fail while the feed publishes them: said in one line, with the fix.

The decisions (back-fill, add to the publication) are the feed's; this module only finds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from changefeed.backends.postgres import catalog, slots
from changefeed.backends.postgres.names import TableName
from changefeed.backends.postgres.tables import (
    Table,
    WatchedTables,
    matching_tables,
    partition_trees,
    tables_by_oid,
)
from changefeed.change import Operation

log = logging.getLogger("changefeed.postgres")

CHECK_SECONDS = 5.0
"""While the stream is quiet, the catalog is compared this often."""


@dataclass
class Found:
    """What changed since the last look."""

    attached: list[tuple[int, int]] = field(default_factory=list)
    """(watched table, partition) for each partition that appeared (the top one of a
    sub-partitioned one)."""
    appeared: list[Table] = field(default_factory=list)
    """Tables a pattern matches now that the feed does not watch."""
    renamed: list[tuple[int, str, str]] = field(default_factory=list)
    """(table, old name, new name) of tables named otherwise than their changes say: their
    changes take the new name once the stream has read the WAL up to ``position`` (where it
    was when the catalog said so), so that changes from before the rename keep the old one."""
    position: int = 0


class Structure:
    """The partitions and pattern matches a feed knows of, compared with the catalog."""

    def __init__(
        self, tables: WatchedTables, names: Sequence[TableName],
        exclude: Sequence[TableName], operation: Operation,
    ) -> None:
        self.tables = tables
        self.patterns = [name for name in names if name.is_pattern]
        self.exclude = list(exclude)
        self.operation = operation
        self.partitions: dict[int, dict[int, int]] | None = None
        """Watched partitioned table -> its partitions (OID -> parent OID), as last seen."""
        self.said: set[tuple[str, Any]] = set()
        """What was said once already (a refused table, a partition without identity)."""

    # -- partitions ----------------------------------------------------------------------------

    def start(self, conn: psycopg.Connection, meta: dict[str, Any]) -> list[tuple[int, int]]:
        """At the feed's start: the partitions that appeared since the publication's record
        was written (none the first time: the record starts here), recorded in ``meta``."""
        recorded = meta.get("partitions")
        self.partitions = {
            int(root): {int(relid): int(parent) for relid, parent in tree.items()}
            for root, tree in (recorded or {}).items() if isinstance(tree, dict)
        } if isinstance(recorded, dict) else None
        attached = self._compare_partitions(conn)
        meta["partitions"] = self.record()
        return attached

    def record(self) -> dict[str, dict[str, int]]:
        return {str(root): {str(relid): parent for relid, parent in tree.items()}
                for root, tree in (self.partitions or {}).items()}

    def _compare_partitions(self, conn: psycopg.Connection) -> list[tuple[int, int]]:
        live = [t.oid for t in self.tables.live() if t.kind == "p"]
        now = partition_trees(conn, live)
        known = self.partitions
        self.partitions = {**(known or {}), **now}
        for root in live:
            self.partitions.setdefault(root, {})
        if known is None:  # nothing recorded before: this is the start
            return []
        attached = []
        for root in live:
            before, after = known.get(root), now.get(root, {})
            if before is None:
                continue  # a table watched from now on: its snapshot is another matter
            new = set(after) - set(before)
            for relid in sorted(new):
                if after[relid] not in new:  # the top of what appeared
                    attached.append((root, relid))
            gone = set(before) - set(after)
            tops = sorted(relid for relid in gone if before[relid] not in gone)
            if tops:
                log.warning(
                    "%s no longer holds %s (detached or dropped): PostgreSQL sends no delete"
                    " for its rows; a consumer holding them must drop them itself",
                    self.tables.name_of(root), catalog.describe_oids(conn, tops))
        return attached

    # -- while the feed runs -------------------------------------------------------------------

    def check(self, conn: psycopg.Connection) -> Found:
        """Compare the catalog with what the feed knows; see the module docstring."""
        found = Found(attached=self._compare_partitions(conn))
        if self.patterns:
            watched = set(self.tables.by_oid)
            found.appeared = [t for t in matching_tables(conn, self.patterns, self.exclude)
                              if t.oid not in watched]
        current = tables_by_oid(conn, [t.oid for t in self.tables.live()])
        for oid, table in current.items():
            old = self.tables.name_of(oid)
            if table.qualified != old:
                found.renamed.append((oid, old, table.qualified))
        if found.renamed:  # applied once the stream has read this far (see `Found`)
            found.position = slots.server_wal_position(conn)
        self._check_identity(conn)
        return found

    def _check_identity(self, conn: psycopg.Connection) -> None:
        if not self.operation & (Operation.UPDATE | Operation.DELETE):
            return
        partitioned = [t for t in self.tables.live() if t.kind == "p"]
        if not partitioned:
            return
        for name in catalog.lacking_identity(conn, partitioned):
            if ("identity", name) not in self.said:
                self.said.add(("identity", name))
                log.error(
                    "%s has no replica identity: the application's UPDATE and DELETE on it"
                    " fail while this feed publishes them; run ALTER TABLE %s REPLICA IDENTITY"
                    " FULL (the event trigger %s does it for new partitions)", name, name,
                    catalog.IDENTITY_GUARD)

    def say_once(self, what: Any, message: str, *args: Any) -> None:
        """Log a warning, once per ``what``."""
        if what not in self.said:
            self.said.add(what)
            log.warning(message, *args)

