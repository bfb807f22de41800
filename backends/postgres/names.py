"""Names: table names as users type them, and the slot and publication names of a feed.

A table is given as PostgreSQL parses it: ``tasks``, ``app.tasks``, ``"My Schema"."With Space"``;
unquoted parts fold to lower case, quoted parts are kept as written. The feed resolves the name
once to the table's OID and follows the OID afterwards (a rename does not lose changes).

Default slot names must never put two table sets on one slot: ``app.tasks`` and ``app_tasks``
(or ``"CamelCase"`` and ``camelcase``) would otherwise share ``changefeed_app_tasks``, and one
feed would consume and acknowledge the other's changes. So a name that had to be changed to be
a valid slot name (lower case, ``[a-z0-9_]``, at most 63 bytes), or that names several tables,
gets a short hash of the exact table names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from changefeed.errors import ConfigurationError

SLOT_PREFIX = "changefeed_"
MAX_NAME = 63  # NAMEDATALEN - 1
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
_UNQUOTED = re.compile(r"[A-Za-z_*?][A-Za-z0-9_$*?]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class TableName:
    """A table name as given: ``schema`` is None when unqualified (found by search_path)."""

    schema: str | None
    name: str
    quoted: bool = False
    """Whether the table part was quoted (a hint for names that only exist in another case)."""

    @property
    def display(self) -> str:
        """The name as logs show it: ``tasks`` for public tables, else ``schema.name``."""
        if self.schema in (None, "public"):
            return self.name
        return f"{self.schema}.{self.name}"

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.name,) if self.schema is None else (self.schema, self.name)

    @property
    def is_pattern(self) -> bool:
        """Whether an unquoted part holds ``*`` or ``?`` (``public.*``, ``app.order_?``)."""
        return any(char in part for part in self.parts for char in "*?")


def parse_table_name(text: str) -> TableName:
    """Parse ``[schema.]table`` with PostgreSQL's rules for quoted and unquoted identifiers."""
    parts: list[tuple[str, bool]] = []
    position = 0
    source = text.strip()
    while True:
        if position < len(source) and source[position] == '"':
            end = position + 1
            chunk = []
            while True:
                close = source.find('"', end)
                if close < 0:
                    raise ConfigurationError(f"bad table name {text!r}: unbalanced double quote")
                chunk.append(source[end:close])
                if source[close + 1 : close + 2] == '"':  # "" stands for one "
                    chunk.append('"')
                    end = close + 2
                    continue
                position = close + 1
                break
            part = "".join(chunk)
            if not part:
                raise ConfigurationError(f"bad table name {text!r}: empty quoted identifier")
            parts.append((part, True))
        else:
            match = _UNQUOTED.match(source, position)
            if match is None:
                raise ConfigurationError(
                    f"bad table name {text!r}: use table, schema.table or \"Quoted Name\""
                )
            parts.append((match.group().lower(), False))
            position = match.end()
        if position == len(source):
            break
        if source[position] != ".":
            raise ConfigurationError(f"bad table name {text!r}: unexpected {source[position]!r}")
        position += 1
    if len(parts) > 2:
        raise ConfigurationError(f"bad table name {text!r}: give at most schema.table")
    for part, _ in parts:
        try:
            size = len(part.encode())
        except UnicodeEncodeError:  # undecodable bytes of a command line (surrogate escapes)
            raise ConfigurationError(f"bad table name {text!r}: not valid text") from None
        if size > MAX_NAME:
            raise ConfigurationError(f"bad table name {text!r}: {part!r} is over 63 bytes")
        if "\0" in part:
            raise ConfigurationError(f"bad table name {text!r}: it holds a NUL character")
    if len(parts) == 1:
        return TableName(None, parts[0][0], parts[0][1])
    return TableName(parts[0][0], parts[1][0], parts[1][1])


def split_tables(table: str | Sequence[str]) -> list[str]:
    """The table names of a comma-separated string (commas inside quotes kept) or a list."""
    if not isinstance(table, str):
        return [t.strip() for t in table if t.strip()]
    names, current, quoted = [], [], False
    for char in table:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            names.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    names.append("".join(current).strip())
    return [name for name in names if name]


def default_slot_name(tables: Sequence[TableName]) -> str:
    """``changefeed_`` + a safe form of the table names, unique per set of table names."""
    display = ",".join(table.display for table in tables)
    safe = re.sub(r"[^a-z0-9_]+", "_", display.lower()).strip("_") or "feed"
    name = SLOT_PREFIX + safe
    if len(tables) == 1 and safe == display and len(name) <= MAX_NAME:
        return name
    exact = "\0".join(sorted(f"{t.schema or 'public'}.{t.name}" for t in tables))
    digest = hashlib.sha256(exact.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - len(digest) - 1]}_{digest}"


def legacy_slot_name(tables: Sequence[str]) -> str:
    """The default name earlier versions gave (it could collide): found to adopt old slots."""
    safe = re.sub(r"[^a-z0-9_]+", "_", "_".join(tables).lower()).strip("_") or "feed"
    return (SLOT_PREFIX + safe)[:MAX_NAME]


def check_slot_name(name: str) -> str:
    """``name`` if PostgreSQL accepts it as a replication slot name, else a clear error."""
    if not isinstance(name, str) or not _SLOT_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid slot name {name!r}: use 1 to 63 lower-case letters, digits and underscores"
        )
    return name


def check_publication_name(name: str) -> str:
    """``name`` if it can name a publication, else a clear error.

    Any text of 1 to 63 bytes works (quotes, commas, spaces, upper case: it is always quoted,
    in SQL and in START_REPLICATION's ``publication_names``), except control characters, which
    would break the one-line messages that quote it (and NUL, which PostgreSQL cannot store).
    """
    problem = _name_problem(name)
    if problem is not None:
        raise ConfigurationError(f"invalid publication name {name!r}: {problem}")
    return name


def check_message_prefix(prefix: str) -> str:
    """``prefix`` if it can match the prefix of a logical decoding message, else a clear error:
    PostgreSQL's prefixes are text without NUL (``""`` matches every message)."""
    if "\0" in prefix:
        raise ConfigurationError(f"invalid message prefix {prefix!r}: it holds a NUL character,"
                                 " which no message prefix can")
    try:
        prefix.encode()
    except UnicodeEncodeError:
        raise ConfigurationError(f"invalid message prefix {prefix!r}: not valid text") from None
    return prefix


def _name_problem(name: str) -> str | None:
    """What keeps ``name`` from being an identifier changefeed creates and quotes (None: fine)."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return "not valid text"
    if not 0 < size <= MAX_NAME:
        return f"use 1 to {MAX_NAME} bytes (it has {size})"
    if _CONTROL.search(name):
        return "it holds a control character (a newline, a tab, NUL...)"
    return None


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier, for text that is parsed as identifiers but is not
    SQL of its own (a string that holds a list of names); in SQL use `psycopg.sql.Identifier`."""
    return '"' + name.replace('"', '""') + '"'


def replication_literal(text: str) -> str:
    """``text`` as a string literal of the replication protocol's commands (START_REPLICATION's
    options), whose scanner knows only ``'...'`` with ``''`` for a quote: no ``E'...'``, and a
    backslash is itself. (`psycopg.sql.Literal` writes ``E'...'`` for text with a backslash,
    which that scanner refuses as a syntax error.)"""
    if "\0" in text:
        raise ConfigurationError(f"{text!r} holds a NUL character, which no option can")
    return "'" + text.replace("'", "''") + "'"


def publication_names_literal(names: Sequence[str]) -> str:
    """pgoutput's ``publication_names`` option, as the string literal START_REPLICATION takes:
    the names as a comma-separated list of quoted identifiers.

    pgoutput splits the option like a list of SQL identifiers, so an unquoted ``Orders`` would
    name ``orders``, and a name holding a comma or a double quote would not parse at all
    (``invalid publication_names syntax``, on every reconnect). Quoted, every name
    `check_publication_name` accepts arrives as it is.
    """
    return replication_literal(
        ",".join(quote_identifier(check_publication_name(name)) for name in names))


def slot_name_for(name: str) -> str:
    """The default slot (and publication) name for a table name or a comma-separated list."""
    return default_slot_name([parse_table_name(t) for t in split_tables(name)])
