"""The output formats, listed once: the CLI, the sinks and the log sources all read them here.

    >>> FORMAT_NAMES
    ('change', 'delta', 'debezium')
    >>> [f.name for f in FORMATS if f.readable]
    ['change', 'debezium']

A `Format` says how a change becomes a JSON line of ``changefeed run`` (`Format.lines`), an
item for a sink and a Kafka record's value (`Format.items`) with its key (`Format.key`), and,
where it can, how a change is read back from a record (`Format.read`; a delta lacks the key,
the position and the old row). Adding a format is adding one `Format` to `FORMATS`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from changefeed.change import Change, Truncate
from changefeed.errors import ConfigurationError
from changefeed.formats import debezium
from changefeed.formats.change_dict import change_from_dict, change_line_encoder
from changefeed.formats.delta import ToDelta, delta_line_encoder
from changefeed.formats.json_values import loads_document


@dataclass(frozen=True)
class FormatOptions:
    """What the caller tells every format (each takes what it needs)."""

    model: str | Mapping[str, str] | None = None
    """The model name of deltas: one for every table, or per table (see `delta_of`)."""
    url: str = ""
    """The source's URL: Debezium's ``source.db`` is its database name."""


def _row_key(change: Change) -> Any:
    return change.key


@dataclass(frozen=True)
class Format:
    """One output format: everything a writer or a reader of it needs."""

    name: str
    """What ``--format``, ``fmt=`` and a Kafka record's ``format`` header call it."""
    summary: str
    """What it holds, for ``--format``'s help."""
    items: Callable[[FormatOptions], Callable[[Change | Truncate], Any]]
    """Makes the function giving each change (or `Truncate`) of one sequence as a JSON-able
    item: a Kafka record's value, what a sink takes. One per sequence: Debezium's counts a
    transaction's changes."""
    lines: Callable[[FormatOptions], Callable[[Any], bytes]]
    """Makes the encoder of ``changefeed run``'s JSON lines: the bytes of ``dumps_line(item)``,
    as fast as they can be made."""
    key: Callable[[Change], Any] = _row_key
    """A Kafka record's key (JSON-able, None for none): the row's key columns by default."""
    read: Callable[[Any, bytes | None], Change | Truncate] | None = None
    """The change a record holds, from its value (decoded JSON) and its key (bytes); None for
    a format a change cannot be rebuilt from."""
    tombstones: bool = False
    """Whether a delete on a log is followed by a tombstone (a record without a value), so that
    log compaction can drop the key."""
    native: bool = False
    """Whether it is the form in which sinks write a `Change` themselves (the change dict), so
    that a pipeline needs no stage to make it."""
    snapshot_markers: bool = False
    """Whether its lines can also say where a table's snapshot starts and ends
    (`changefeed.change.SnapshotState`)."""

    @property
    def readable(self) -> bool:
        """Whether a change can be read back from it."""
        return self.read is not None

    def stage(self, options: FormatOptions) -> Callable[[Change], Any] | None:
        """What a pipeline puts before a sink taking any JSON item, to give it this format;
        None for the form such a sink writes a change in by itself."""
        return None if self.native else self.items(options)


def _debezium_source(options: FormatOptions) -> debezium.Source:
    return debezium.Source(database=debezium.database_of(options.url))


def _debezium_encoder(options: FormatOptions) -> debezium.DebeziumEncoder:
    return debezium.DebeziumEncoder(_debezium_source(options))


def _read_debezium(value: Any, key: bytes | None) -> Change | Truncate:
    return debezium.change_from_debezium(value, loads_document(key or b"null"))


_to_dict = operator.methodcaller("to_dict")  # a Change's, a Truncate's


FORMATS = (
    Format(
        "change", "the full change with its position",
        items=lambda options: _to_dict,
        lines=lambda options: change_line_encoder(),
        read=lambda value, key: change_from_dict(value),
        native=True,
        snapshot_markers=True,
    ),
    Format(
        "delta", "a Snorky delta",
        items=lambda options: ToDelta(options.model),
        lines=lambda options: delta_line_encoder(options.model),
    ),
    Format(
        "debezium", "Debezium's envelope",
        items=_debezium_encoder,
        lines=lambda options: debezium.line_encoder(_debezium_source(options)),
        key=debezium.key,
        read=_read_debezium,
        tombstones=True,
    ),
)
"""Every format, in the order messages list them."""

FORMAT_NAMES = tuple(known.name for known in FORMATS)
_BY_NAME = {known.name: known for known in FORMATS}


def format_named(name: str) -> Format:
    """The format called ``name``; `ConfigurationError` naming the others for any other name."""
    found = _BY_NAME.get(name)
    if found is None:
        raise ConfigurationError(f"unknown format {name!r}: use one of {', '.join(FORMAT_NAMES)}")
    return found


__all__ = ["FORMATS", "FORMAT_NAMES", "Format", "FormatOptions", "format_named"]
