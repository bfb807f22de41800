"""What the application's DDL does to a running PostgreSQL feed (see `structure`, which notices
it): tables a pattern matched that cannot be published, partitions attached, tables that appeared
or were renamed, watched tables dropped. `PostgresChangeFeed` takes these methods from
`StructureReactions`; its stream loop (`streaming`) calls them between reads of the stream."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from changefeed.backends.postgres import catalog
from changefeed.backends.postgres.backfill import Backfills, in_chunks
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.pgoutput import PgOutputDecoder
from changefeed.backends.postgres.publication import add_tables, refusal
from changefeed.backends.postgres.stream import ReplicationStream
from changefeed.backends.postgres.structure import Structure
from changefeed.backends.postgres.tables import Table, WatchedTables, tables_by_oid
from changefeed.change import Operation
from changefeed.errors import ConfigurationError

log = logging.getLogger("changefeed.postgres")


class StructureReactions:
    """The part of `PostgresChangeFeed` that answers the application's DDL: the feed's state it
    reads and changes is declared below (set by the feed's ``__init__`` and start)."""

    tables: list[str]
    operation: Operation
    prefeed: Any
    slot: str
    publication: str
    _tables: WatchedTables
    _structure: Structure
    _backfills: Backfills
    _ledger: AckLedger
    _meta: dict[str, Any]
    _server_version: int
    _sql: psycopg.Connection | None
    _decoder: PgOutputDecoder | None
    _renames: dict[int, tuple[str, int]]

    def _leave_out_refused(self, conn: psycopg.Connection) -> None:
        """Tables a pattern matched that could not be published (their UPDATE/DELETE would
        fail) are left out, said once, rather than refusing the feed (a named one is
        refused: `ensure_publication`)."""
        for table in [t for t in self._tables.by_oid.values() if t.from_pattern]:
            why = refusal(conn, table, self.operation)
            if why is not None:
                del self._tables.by_oid[table.oid]
                self._tables.stream_names.pop(table.oid, None)
                self._structure.say_once(("refused", table.qualified), "%s matches %s but is"
                                         " not streamed: %s", table.qualified,
                                         ", ".join(self.tables), why)
        if not self._tables.by_oid:
            raise ConfigurationError(
                f"no table of {', '.join(self.tables)} can be streamed (see above)")

    def _start_structure(self, conn: psycopg.Connection, chunked: bool) -> None:
        """At the feed's start: the back-fills to go on with or begin (a snapshot, tables a
        pattern matched since, partitions attached since), and what the operations miss."""
        attached = self._structure.start(conn, self._meta)
        if self._own_publication():
            if chunked:
                self._backfills.plan(conn, self._meta, pending_only=self.prefeed != "snapshot")
                for root, partition in attached:
                    self._backfill_partition(root, partition)
            catalog.write_meta(conn, self.publication, self._meta)
        else:
            # Shared with another slot's feed: the record's back-fills are that feed's (taken
            # here, that feed's record would move past rows it never delivered).
            for root, partition in attached:
                self._say_partition_missed(root, partition)
        self._warn_moves()

    def _own_publication(self) -> bool:
        """Whether the publication's record is this feed's slot's (not another's it shares)."""
        return self._meta.get("slot") == self.slot

    def _say_partition_missed(self, root: int, partition: int) -> None:
        self._structure.say_once(
            ("attached", partition), "a partition of %s appeared: its rows from before are not"
            " delivered (%s)", self._tables.name_of(root),
            "the publication is not this feed's own" if not self._own_publication()
            else "chunked back-fills need PostgreSQL 14")

    def _warn_moves(self) -> None:
        moves = self.operation & Operation.UPDATE and not (
            self.operation & Operation.INSERT and self.operation & Operation.DELETE)
        partitioned = [t.qualified for t in self._tables.live() if t.kind == "p"]
        if moves and partitioned:
            log.warning(
                "an UPDATE that moves a row of %s to another partition is a delete and an"
                " insert there, which --ops %s does not deliver: add insert,delete to see it",
                ", ".join(partitioned), ",".join(self.operation.names))

    def _watch_structure(self, conn: psycopg.Connection) -> None:
        self._tables.note_dropped(conn)
        found = self._structure.check(conn)
        chunked = in_chunks(self._server_version, ())
        own = self._own_publication()
        for root, partition in found.attached:
            if chunked and own:
                self._backfill_partition(root, partition)
            else:
                self._say_partition_missed(root, partition)
        if found.appeared:
            self._add_tables(conn, found.appeared, chunked)
        for oid, _, new in found.renamed:
            self._renames.setdefault(oid, (new, found.position))
        if (found.attached or found.appeared) and own:
            catalog.write_meta(conn, self.publication, self._meta)

    def _backfill_partition(self, root: int, partition: int) -> None:
        self._meta["partitions"] = self._structure.record()
        self._backfills.start_table(
            root, source=partition, markers=False,
            why=f"a partition of {self._tables.name_of(root)} appeared (created or attached)"
                f" with rows it may hold from before: back-filling it")

    def _add_tables(self, conn: psycopg.Connection, tables: list[Table], chunked: bool) -> None:
        """Tables a pattern matches that appeared: streamed from now on and back-filled."""
        own = self._own_publication()
        if not own or not chunked:
            for table in tables:
                self._structure.say_once(
                    ("appeared", table.oid), "%s matches %s but is streamed from the next run"
                    " on (%s)", table.qualified, ", ".join(self.tables),
                    "the publication is not this feed's own" if not own
                    else "chunked back-fills need PostgreSQL 14")
            return
        added, refused = add_tables(conn, self.publication, tables, self._meta,
                                    self.operation)
        for name, why in refused.items():
            self._structure.say_once(("refused", name), "%s matches %s but is not streamed:"
                                     " %s", name, ", ".join(self.tables), why)
        decoder = self._decoder
        for table in added:
            self._tables.add(table)
            if decoder is not None and decoder.table_names is not None:
                decoder.table_names[table.oid] = table.qualified
                decoder.primary_keys[table.oid] = table.key
            log.warning("%s appeared (it matches %s): streaming it, and back-filling its rows",
                        table.qualified, ", ".join(self.tables))
            self._backfills.start_table(table.oid)
        if added:
            self._meta["partitions"] = self._structure.record()

    def _renamed(self, oid: int, old: str, new: str, *, late: bool = False) -> None:
        """Table ``oid`` is ``new`` from here on in the stream: its changes carry that name;
        with a snapshot prefeed its rows are read again under it. ``late``: the catalog said
        so, not the stream (a schema renamed), so changes since the rename had the old name."""
        self._renames.pop(oid, None)
        self._tables.stream_names[oid] = new
        decoder = self._decoder
        if decoder is not None and decoder.table_names is not None:
            decoder.table_names[oid] = new
        self._backfills.renamed(oid, new)
        # Not while a restarted stream replays changes from before a rename (their Relation
        # says the name they had): only under the name the table has now.
        again = (self.prefeed == "snapshot" and in_chunks(self._server_version, ())
                 and self._sql is not None and _current_name(self._sql, oid) == new)
        log.warning("table %s is now %s: its changes go on under the new name%s%s", old, new,
                    " (those committed since the rename until now carry the old one: the"
                    " stream does not say when a schema is renamed)" if late else "",
                    ", and its rows are read again under it (a consumer holding rows under"
                    f" {old} must drop them)" if again else "")
        if again:
            self._backfills.start_table(oid)

    def _apply_renames(self, read_up_to: int) -> None:
        """Renames the catalog showed, once the stream has read as far as the WAL went then
        (a Relation message with the new name would have come first)."""
        for oid, (new, position) in list(self._renames.items()):
            if read_up_to >= position:
                self._renamed(oid, self._tables.name_of(oid), new, late=True)

    def _end_if_dropped_tables_delivered(self, stream: ReplicationStream) -> None:
        """End the feed once everything up to the drop of a watched table is acknowledged."""
        if self._ledger.delivered_through(self._tables.dropped_until):
            stream.send_status()
            raise self._tables.dropped_error(self.slot)
        stream.send_status(reply=True)  # the reply tells how far the server's WAL goes


def _current_name(conn: psycopg.Connection, oid: int) -> str | None:
    table = tables_by_oid(conn, [oid]).get(oid)
    return table.qualified if table is not None else None
