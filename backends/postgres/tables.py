"""The tables a feed watches: names and patterns resolved to OIDs, followed by OID afterwards.

Tables are identified by OID: names are resolved once (`resolve_tables`: by the connection's
search_path, ``*`` and ``?`` patterns, exclusions), a renamed table is found again, and a
dropped one is noticed with the WAL position of its drop (`WatchedTables`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from changefeed.backends.postgres.names import TableName
from changefeed.backends.postgres.protocol import format_lsn, parse_lsn
from changefeed.errors import ConfigurationError, PermanentBackendError

log = logging.getLogger("changefeed.postgres")


@dataclass
class Table:
    """A watched table as the catalog describes it now.

    ``key`` is what identifies a row in every change of the table, snapshot and stream alike
    (`key_columns`): the columns of the replica identity index under ``REPLICA IDENTITY USING
    INDEX`` (the only ones PostgreSQL sends for a delete then), else the primary key; empty
    when there is neither, and then the key is the whole row.
    """

    oid: int
    schema: str
    name: str
    kind: str
    """``r`` (table) or ``p`` (partitioned table)."""
    key: list[str] = field(default_factory=list)
    identity: str = "d"
    """``relreplident``: ``d`` default (the primary key), ``f`` full, ``i`` an index, ``n``
    nothing."""
    from_pattern: bool = False
    """Matched by a pattern (``app.*``), not named."""

    @property
    def whole_row(self) -> bool:
        """Whether the key is the whole row (no primary key, no identity index)."""
        return not self.key

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


_TABLE_COLUMNS = (
    "SELECT c.oid, n.nspname, c.relname, c.relkind,"
    # The key (see `Table`): the identity index under REPLICA IDENTITY USING INDEX, else
    # the primary key.
    " coalesce((SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_index i"
    "   CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
    "   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
    "   WHERE i.indexrelid = (SELECT x.indexrelid FROM pg_index x WHERE x.indrelid = c.oid"
    "     AND (x.indisprimary OR (c.relreplident = 'i' AND x.indisreplident))"
    "     ORDER BY c.relreplident = 'i' AND x.indisreplident DESC LIMIT 1)), '{}'),"
    " c.relreplident"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
)


def _table(row: Sequence[Any]) -> Table:
    return Table(row[0], row[1], row[2], row[3], list(row[4]), row[5])


def resolve_tables(
    conn: psycopg.Connection, names: Sequence[TableName], exclude: Sequence[TableName] = ()
) -> list[Table]:
    """The tables ``names`` refer to (by the connection's search_path for unqualified ones);
    patterns (``public.*``) match tables and partitioned tables, not partitions, and
    ``exclude`` (names or patterns) takes tables out."""
    tables = []
    for name in names:
        if name.is_pattern:
            matched = _matching(conn, name)
            if not matched:
                raise ConfigurationError(
                    f"no table matches {'.'.join(name.parts)!r} in database {conn.info.dbname!r}"
                )
            tables.extend(t for t in matched if t.oid not in {seen.oid for seen in tables})
            continue
        regclass = sql.Identifier(*name.parts).as_string(conn)
        row = conn.execute(_TABLE_COLUMNS + " WHERE c.oid = to_regclass(%s)", [regclass]).fetchone()
        if row is None or row[3] not in ("r", "p"):
            raise ConfigurationError(_missing_table(conn, name, row))
        tables.append(_table(row))
    if len({table.oid for table in tables}) != len(tables):
        raise ConfigurationError("the same table is listed twice")
    excluded = {t.oid for name in exclude for t in _matching(conn, name)}
    tables = [table for table in tables if table.oid not in excluded]
    if not tables:
        raise ConfigurationError("--exclude leaves no table to stream")
    return tables


def _matching(conn: psycopg.Connection, name: TableName) -> list[Table]:
    """The tables a name or pattern matches (``*`` any text, ``?`` one character)."""

    def like(text: str) -> str:
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return escaped.replace("*", "%").replace("?", "_")

    schema_clause = (
        "n.nspname LIKE %s" if name.schema is not None
        else "n.nspname = ANY(current_schemas(false)) AND %s::text IS NULL"
    )
    rows = conn.execute(
        _TABLE_COLUMNS + " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
        f" AND {schema_clause} AND c.relname LIKE %s ORDER BY n.nspname, c.relname",
        [like(name.schema) if name.schema is not None else None, like(name.name)],
    ).fetchall()
    tables = [_table(row) for row in rows]
    for table in tables:
        table.from_pattern = True
    return tables


def matching_tables(
    conn: psycopg.Connection, names: Sequence[TableName], exclude: Sequence[TableName] = ()
) -> list[Table]:
    """The tables the patterns among ``names`` match now, less ``exclude``'s (no error when
    none does)."""
    excluded = {t.oid for name in exclude for t in _matching(conn, name)}
    found: dict[int, Table] = {}
    for name in names:
        if name.is_pattern:
            for table in _matching(conn, name):
                if table.oid not in excluded:
                    found.setdefault(table.oid, table)
    return list(found.values())


def partition_trees(conn: psycopg.Connection, oids: Sequence[int]) -> dict[int, dict[int, int]]:
    """For each partitioned table among ``oids``: its partitions at every level, each with
    its parent (relation OID -> parent OID)."""
    rows = conn.execute(
        "SELECT t.oid::bigint, p.relid::oid::bigint, p.parentrelid::oid::bigint"
        " FROM unnest(%s::oid[]) AS t(oid) JOIN pg_class c ON c.oid = t.oid AND c.relkind = 'p'"
        " CROSS JOIN LATERAL pg_partition_tree(t.oid) p WHERE p.level > 0",
        [list(oids)],
    ).fetchall()
    trees: dict[int, dict[int, int]] = {}
    for root, relid, parent in rows:
        trees.setdefault(root, {})[relid] = parent
    return trees


def tables_by_oid(conn: psycopg.Connection, oids: Sequence[int]) -> dict[int, Table]:
    """The tables among ``oids`` that still exist, by OID (a missing one was dropped)."""
    rows = conn.execute(_TABLE_COLUMNS + " WHERE c.oid = ANY(%s)", [list(oids)]).fetchall()
    return {row[0]: _table(row) for row in rows}


def stream_columns(conn: psycopg.Connection, oid: int) -> list[str]:
    """The columns pgoutput sends of table ``oid`` (not dropped, not generated), in order: what
    a snapshot row holds, so that it has the stream's shape."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
        " AND NOT attisdropped AND attgenerated = '' ORDER BY attnum", [oid],
    ).fetchall()
    return [row[0] for row in rows]


def _missing_table(conn: psycopg.Connection, name: TableName, row: Any) -> str:
    database = conn.info.dbname
    typed = ".".join(name.parts)
    if row is not None:
        return f"{typed!r} is not a table (relkind {row[3]!r}) in database {database!r}"
    message = f"table {typed!r} does not exist in database {database!r}"
    if not name.quoted:  # an unquoted name folds to lower case: maybe it exists quoted
        similar = conn.execute(
            "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE lower(c.relname) = %s AND c.relkind IN ('r', 'p')"
            " AND (%s::text IS NULL OR lower(n.nspname) = %s) ORDER BY 1 LIMIT 3",
            [name.name.lower(), name.schema, name.schema],
        ).fetchall()
        if similar:
            found = ", ".join(row[0] for row in similar)
            message += f"; did you mean {found}? (quote mixed-case names: '\"Name\"')"
    return message


def dropped_tables(conn: psycopg.Connection, oids: Sequence[int]) -> tuple[list[int], int]:
    """The tables among ``oids`` that no longer exist, and the server's WAL position now:
    every change of theirs was written before it."""
    found = tables_by_oid(conn, oids)
    gone = [oid for oid in oids if oid not in found]
    if not gone:
        return [], 0
    (lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("0/0",)
    return gone, parse_lsn(lsn)


class WatchedTables:
    """The feed's tables by OID: resolved once by name, then followed by OID (a rename keeps
    the table; the stream tells its new name), and noted when dropped."""

    def __init__(self) -> None:
        self.by_oid: dict[int, Table] = {}
        self.stream_names: dict[int, str] = {}
        """OID -> the name the stream last gave the table (what its changes carry)."""
        self.dropped: dict[int, tuple[str, int]] = {}
        """OID -> (name, the WAL position at which the table was seen gone)."""

    def check(
        self, conn: psycopg.Connection, names: Sequence[TableName],
        exclude: Sequence[TableName],
    ) -> None:
        """Resolve ``names`` on the first call; afterwards note the tables dropped since."""
        if self.by_oid:
            self.note_dropped(conn)
            return
        resolved = resolve_tables(conn, names, exclude)
        self.by_oid = {table.oid: table for table in resolved}
        self.stream_names = {table.oid: table.qualified for table in resolved}

    def note_dropped(self, conn: psycopg.Connection) -> None:
        """Note tables that no longer exist, and the WAL position at which they were seen
        gone: the feed delivers every change up to there, then ends."""
        watched = [oid for oid in self.by_oid if oid not in self.dropped]
        gone, lsn = dropped_tables(conn, watched)
        for oid in gone:
            name = self.name_of(oid)
            self.dropped[oid] = (name, lsn)
            log.warning("table %s was dropped: delivering its changes up to %s, then stopping",
                        name, format_lsn(lsn))

    @property
    def dropped_until(self) -> int:
        """The WAL position up to which the dropped tables' changes are delivered."""
        return max(lsn for _, lsn in self.dropped.values())

    def dropped_error(self, slot: str) -> PermanentBackendError:
        """The end of a feed whose dropped tables' changes were all delivered."""
        names = ", ".join(sorted(name for name, _ in self.dropped.values()))
        return PermanentBackendError(
            f"table {names} was dropped: every change before the drop was delivered;"
            f" drop the feed's slot (changefeed slots --drop {slot}) if it is not"
            " needed any more"
        )

    def name_of(self, oid: int) -> str:
        return self.stream_names.get(oid) or self.by_oid[oid].qualified

    def add(self, table: Table) -> None:
        """Watch ``table`` too (it appeared while the feed ran)."""
        self.by_oid[table.oid] = table
        self.stream_names[table.oid] = table.qualified

    def live(self) -> list[Table]:
        """The tables not dropped."""
        return [table for oid, table in self.by_oid.items() if oid not in self.dropped]
