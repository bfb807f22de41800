"""The feed's publication: its name, and bringing it to the feed's tables and operations.

`choose_names` continues the slot and publication that already serve the tables (a feed with
default names restarted after a rename); `ensure_publication` is the only step of a feed's
start that writes to the server, and runs last, so that a mistake ends with one clear line
before anything is changed (see `feed.PostgresChangeFeed.run_changefeed`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from changefeed.backends.postgres import catalog, slots
from changefeed.backends.postgres.tables import Table
from changefeed.change import Operation
from changefeed.errors import ConfigurationError, PermanentBackendError, first_line

log = logging.getLogger("changefeed.postgres")


def choose_names(
    conn: psycopg.Connection, slot: str, tables: Sequence[Table], legacy_name: str
) -> tuple[str, str] | None:
    """For a feed with default names whose ``slot`` does not exist: the (slot, publication)
    with default names that already serves ``tables``, found by OID (a table renamed since
    keeps its slot), or the slot an earlier version named ``legacy_name``; else None."""
    if slots.get_slot(conn, slot) is not None:
        return None
    found = catalog.find_default_slot(conn, tables, [legacy_name])
    if found is None or found[0] == slot:
        return None
    log.warning("continuing slot %s, which streams %s (under an earlier name)",
                found[0], ", ".join(t.qualified for t in tables))
    return found


@dataclass
class PublicationSetup:
    """What `ensure_publication` did."""

    meta: dict[str, Any]
    """changefeed's record on the publication (see `catalog`), as written."""
    created: bool
    """The publication was created now (drop it if the feed never starts)."""


def ensure_publication(
    conn: psycopg.Connection, name: str, tables: Sequence[Table], *, slot: str,
    operation: Operation, default_names: bool, backfill_added: bool,
) -> PublicationSetup:
    """Create the publication or bring it to the feed's tables and operations.

    Refuses, before changing anything, tables whose UPDATE/DELETE would then fail and a
    publication that serves other tables or another slot. The slot's own publication follows
    the feed's list of tables; with ``backfill_added``, each added table is recorded as to be
    back-filled while the others stream on.
    """
    qualified = ", ".join(t.qualified for t in tables)
    publication = catalog.get_publication(conn, name)
    if publication is not None:
        catalog.check_publication(conn, publication, tables, slot, operation)
    catalog.check_slot_owner(conn, slot, name, tables)
    try:
        check_identity(conn, tables, operation)
    except ConfigurationError as exc:
        published = [t for t in tables if publication and t.oid in publication.table_oids]
        if not any(refusal(conn, table, operation) for table in published):
            raise
        # The publication a feed made earlier publishes them already: the application's
        # statements fail now, whether this feed runs or not.
        raise ConfigurationError(
            f"{exc.message}. Publication {name} already publishes it, so they fail now: fix"
            f" that, or drop the feed with changefeed slots --drop {slot}"
        ) from exc
    meta = dict(publication.meta) if publication is not None else {}
    owner = meta.get("slot", slot)
    if owner != slot and slots.get_slot(conn, owner) is None:
        # The record is of a slot dropped since: its snapshot and back-fills are not this
        # slot's, which takes the publication over (and its own snapshot, if it asks for one).
        log.info("publication %s was slot %s's, which is gone: now slot %s's", name, owner, slot)
        meta, owner = {}, slot
    elif owner != slot and backfill_added:
        # The record's snapshot and back-fill states are the other slot's: taken as this
        # slot's, they would skip its snapshot (delivered to the other) or move the other's
        # back-fill past rows it never delivered.
        raise ConfigurationError(
            f"publication {name} records the snapshot of slot {owner}: a snapshot for slot"
            f" {slot} needs a publication of its own (choose another --publication)"
        )
    if owner == slot:  # the record is of the slot that made it
        meta.update(slot=slot, default=default_names,
                    tables={str(t.oid): t.qualified for t in tables})
    try:
        if publication is None:
            catalog.create_publication(conn, name, tables, operation, meta)
            log.info("created publication %s for %s (%s)", name, qualified,
                     ", ".join(operation.names))
        else:
            catalog.update_publication(conn, publication, operation)
            if publication.table_oids != {t.oid for t in tables}:
                _change_tables(conn, publication, tables, meta, slot, backfill_added)
            if meta != publication.meta:
                catalog.write_meta(conn, name, meta)
    except psycopg.errors.InsufficientPrivilege as exc:
        quoted = ", ".join(t.identifier.as_string(conn) for t in tables)
        raise PermanentBackendError(
            f"cannot set up publication {name}: {first_line(exc)}; the tables' owner can run:"
            f" CREATE PUBLICATION {sql.Identifier(name).as_string(conn)} FOR TABLE {quoted}"
            f" WITH (publish = '{', '.join(operation.names)}', publish_via_partition_root ="
            " true)"
        ) from exc
    return PublicationSetup(meta, publication is None)


def check_identity(
    conn: psycopg.Connection, tables: Sequence[Table], operation: Operation
) -> None:
    """Refuse tables whose UPDATE/DELETE would fail (or could, for partitions to come) once
    a publication of ``operation`` publishes them (see `catalog`)."""
    catalog.check_replica_identity(conn, tables, operation)
    catalog.check_partition_identity(conn, tables, operation)


def refusal(conn: psycopg.Connection, table: Table, operation: Operation) -> str | None:
    """Why `check_identity` refuses ``table``, or None."""
    try:
        check_identity(conn, [table], operation)
    except ConfigurationError as exc:
        return exc.message
    return None


def add_tables(
    conn: psycopg.Connection, name: str, tables: Sequence[Table], meta: dict[str, Any],
    operation: Operation,
) -> tuple[list[Table], dict[str, str]]:
    """Add ``tables`` (that appeared while the feed ran: a pattern matches them now) to the
    feed's publication ``name``, each recorded in ``meta`` as to be back-filled: its rows
    committed before it was added never went through the slot. Returns the tables added and,
    for the others, why not (their UPDATE/DELETE would fail, or no privilege)."""
    added: list[Table] = []
    refused: dict[str, str] = {}
    for table in tables:
        why = refusal(conn, table, operation)
        if why is not None:
            refused[table.qualified] = why
        else:
            added.append(table)
    if not added:
        return added, refused
    try:
        catalog.add_publication_tables(conn, name, added)
    except psycopg.Error as exc:
        return [], {table.qualified: first_line(exc) for table in added}
    meta.setdefault("tables", {}).update({str(t.oid): t.qualified for t in added})
    states = meta.setdefault("backfill", {})
    for table in added:
        states[str(table.oid)] = {"after": None, "done": 0, "chunks": 0}
    catalog.write_meta(conn, name, meta)
    return added, refused


def _change_tables(
    conn: psycopg.Connection, publication: catalog.Publication,
    tables: Sequence[Table], meta: dict[str, Any], slot: str, backfill_added: bool,
) -> None:
    added, removed = catalog.set_publication_tables(conn, publication, tables)
    states = dict(meta.get("backfill") or {})
    for oid in removed:
        states.pop(str(oid), None)
    for table in added:
        if backfill_added or table.from_pattern:
            states[str(table.oid)] = {"after": None, "done": 0, "chunks": 0}
    meta["backfill"] = states
    filled = [t.qualified for t in added if backfill_added or t.from_pattern]
    unfilled = [t.qualified for t in added if not (backfill_added or t.from_pattern)]
    if filled:
        # Matched by a pattern, a table is new to the feed: its rows are new changes.
        log.warning("slot %s now also streams %s (back-filled first)", slot, ", ".join(filled))
    if unfilled:
        log.warning("slot %s now also streams %s; its rows from before are not delivered"
                    " (--prefeed snapshot, or changefeed backfill, reads them)", slot,
                    ", ".join(unfilled))
    if removed:
        log.warning("slot %s no longer streams %s", slot, catalog.describe_oids(conn, removed))

