"""Changes on a log: how a Redis stream entry or a Kafka record holds a change, both ways.

The sinks that write a log (`changefeed.pipelines.sinks.redis`, `changefeed.pipelines.sinks.kafka`)
and the feeds that read it back (`changefeed.backends.redis_streams`, `changefeed.backends.kafka`)
run in different processes, often on different machines and versions: what one writes the other
must read, so both take the encoding from here. Everything here but `warn_once` (the one log
line both Kafka ends share) is a pure function of a `Change` or of the bytes read, tested without
a server.

* The JSON form of a change is ``Change.to_dict()``; `changefeed.formats.change_dict` reverses it.
  A reader reads the JSON exactly (`changefeed.formats.json_values.loads_document`): numbers
  keep their digits, and what is nested too deep for Python stays its exact text, so no value
  a sink wrote can stop or change a feed reading it back.
* A Redis stream entry holds that JSON in the field ``change`` and the source position (JSON) in
  ``position``.
* A Kafka record goes to its table's topic (`topic_for`). Its key is the JSON of the row's key
  columns (Debezium's key for that format), so every change of a row goes to one partition; its
  value is the change in one of the formats (`changefeed.formats.registry`); its headers say
  ``operation``, ``table``, ``position`` (JSON), ``format`` (so a reader knows how to decode the
  value) and, for a change that has one, ``schema_version``.
* A `Truncate` is a record of its own in the same shape, with no key (as Debezium's truncate
  events), marked `Record.every_partition`: the sink writes it to every partition of the
  table's topic, so that on each partition it comes after every change of the table committed
  before it and before every later one (Kafka orders records only within a partition). A reader
  gets one `Truncate` per partition it reads. In a Redis stream (one sequence) it is one entry.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from changefeed.change import Change, Truncate
from changefeed.errors import ConfigurationError, DecodeError, PipelineError
from changefeed.formats.change_dict import change_from_dict
from changefeed.formats.codec import dumps
from changefeed.formats.json_values import loads_document
from changefeed.formats.registry import FORMATS, FormatOptions, format_named


def read_back(change: Change | Truncate, position: Any) -> Change | Truncate:
    """``change`` as a feed reading a log emits it: at the log's ``position``, with the
    position it had at its source in ``meta["source_position"]``."""
    if isinstance(change, Truncate):
        return dataclasses.replace(
            change, position=position,
            meta={**(change.meta or {}), "source_position": change.position},
        )
    return Change(
        change.operation, change.table, new=change.new, old=change.old, key=change.key,
        position=position, committed_at=change.committed_at, transaction=change.transaction,
        snapshot=change.snapshot,
        meta={**(change.meta or {}), "source_position": change.position},
        schema_version=change.schema_version,
    )


# -- Redis stream entries ----------------------------------------------------------------------


def stream_entry(change: Change | Truncate, position: Any) -> dict[str, bytes]:
    """The fields of ``change``'s stream entry (a `Truncate`'s too): its JSON and its source
    position."""
    return {"change": dumps(change.to_dict()), "position": dumps(position)}


def change_of_entry(
    fields: dict[bytes, bytes] | None, where: str = "a stream entry"
) -> Change | Truncate | None:
    """The change (or `Truncate`) a stream entry holds; None for an entry trimmed or deleted
    meanwhile (Redis then gives no fields).

    ``where`` names the entry in errors (``stream entry id``). Raises `DecodeError` for a
    ``change`` field that does not hold a change.
    """
    if not fields or b"change" not in fields:
        return None
    try:
        return change_from_dict(loads_document(fields[b"change"]))
    except (ValueError, DecodeError) as exc:
        raise DecodeError(f"{where} is not a change record: {exc}") from exc


# -- Kafka records -----------------------------------------------------------------------------

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_PLACEHOLDERS = {"table": "public.tasks", "schema": "public", "name": "tasks"}


def topic_for(template: str, table: str) -> str:
    """The topic of ``table``: ``{table}`` (``public.tasks``), ``{schema}``, ``{name}`` (``tasks``).
    """
    schema, _, name = table.rpartition(".")
    topic = template.format(table=table, schema=schema, name=name)
    if not _TOPIC.fullmatch(topic):
        raise PipelineError(
            f"{topic!r} (from topic template {template!r}) is not a Kafka topic name: use"
            " letters, digits, '.', '_' and '-' (at most 249)"
        )
    return topic


def check_topic_template(template: str) -> None:
    """Raise `ConfigurationError` unless ``template`` uses only the placeholders of `topic_for`."""
    try:
        template.format(**_PLACEHOLDERS)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(
            f"bad topic template {template!r} ({exc}): use text with {{table}}, {{schema}} or"
            " {name}"
        ) from None


class Record(NamedTuple):
    """One Kafka record, as the producer takes it."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    every_partition: bool = False
    """Written to each partition of the topic (a truncate: see the module docstring)."""


class RecordEncoder:
    """Makes the Kafka records of changes, one after another, in one of the `FORMATS`.

    It remembers each table's topic, and (``debezium``) the counters of the transaction in
    progress, so one encoder serves one sequence of changes.
    """

    def __init__(
        self, topic: str = "{table}", fmt: str = "change",
        model: str | Mapping[str, str] | None = None,
    ) -> None:
        self.format = format_named(fmt)
        check_topic_template(topic)
        self.topic = topic
        self.fmt = fmt
        self.model = model
        self._item = self.format.items(FormatOptions(model=model))
        self._topics: dict[str, str] = {}

    def records(self, change: Change | Truncate, position: Any) -> list[Record]:
        """The records of ``change``: one, and for a delete in a format with tombstones
        (Debezium's) a tombstone after it, so that log compaction can drop the key. A
        `Truncate` is one record without a key, for every partition."""
        topic = self._topics.get(change.table)
        if topic is None:
            topic = self._topics[change.table] = topic_for(self.topic, change.table)
        if isinstance(change, Truncate):
            headers = [("operation", b"truncate"), ("table", change.table.encode()),
                       ("position", dumps(position)), ("format", self.fmt.encode())]
            return [Record(topic, None, dumps(self._item(change)), headers,
                           every_partition=True)]
        key = self.format.key(change)
        headers = [
            ("operation", (change.operation.name or "").lower().encode()),
            ("table", change.table.encode()),
            ("position", dumps(position)),
            ("format", self.fmt.encode()),
        ]
        if change.schema_version is not None:
            headers.append(("schema_version", change.schema_version.encode()))
        record = Record(topic, None if key is None else dumps(key), dumps(self._item(change)),
                        headers)
        if self.format.tombstones and change.key is not None and change.new is None:
            return [record, record._replace(value=None)]
        return [record]


def change_of_record(
    value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]] | None, where: str
) -> Change | Truncate | None:
    """The change (or `Truncate`) a Kafka record holds; None for a tombstone.

    ``where`` names the record in errors (``topic[partition]@offset``). Raises `DecodeError`
    for a value that is not in a readable format or not what its ``format`` header says.
    """
    if value is None:
        return None
    name = (dict(headers or []).get("format") or b"change").decode(errors="replace")
    read = next((known.read for known in FORMATS if known.name == name), None)
    if read is None:
        readable = " or ".join(known.name for known in FORMATS if known.readable)
        raise DecodeError(f"{where} holds a {name!r} record: KafkaFeed reads records"
                            f" written with format {readable}")
    try:
        return read(loads_document(value), key)
    except (ValueError, DecodeError) as exc:
        raise DecodeError(f"{where} is not a {name} record: {exc}") from exc


def warn_once(owner: Any, error: Any, log: logging.Logger) -> None:
    """Log librdkafka's ``error`` for ``owner`` (a Kafka sink or feed) unless it repeats the one
    before: librdkafka reports each of its retries."""
    text = error.str()
    if getattr(owner, "_last_error", None) != text:
        owner._last_error = text
        log.warning("%s: %s", owner.name, text)


__all__ = [
    "Record", "RecordEncoder", "change_of_entry",
    "change_of_record", "check_topic_template", "read_back", "stream_entry", "topic_for",
    "warn_once",
]
