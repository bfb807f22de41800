"""Kafka: keyed, ordered change records for every tool that reads Kafka, and workers sharing them.

    database feed --Pipeline--> KafkaSink --produce--> topic per table (key = primary key)
    topics --consumer group--> KafkaFeed (worker 1) --Pipeline--> stages -> sink
                           \\--> KafkaFeed (worker 2) --Pipeline--> stages -> sink

`KafkaSink` writes each change as one record: the key is the JSON of the row's key columns, so
every change of a row goes to the same partition, in commit order; the value is the change in
the chosen format (``change``: ``Change.to_dict()``, ``delta``: a Snorky delta, ``debezium``:
Debezium's envelope, followed by a tombstone after a delete as Debezium does); the headers say
``operation``, ``table``, ``position`` (JSON) and ``format``. The producer is idempotent
(``enable.idempotence``: no duplicates or reordering from its own retries). A batch counts as
delivered only once the broker confirmed every record of it (delivery reports), so the pipeline
acknowledges a database position only after everything up to it is in Kafka: a crash loses
nothing and at worst repeats the last batch. While the broker is unreachable the producer
retries with backoff; after ``timeout`` seconds the batch fails with one clear error.

`KafkaFeed` reads such topics (``format`` ``change`` or ``debezium``) through a consumer group, so
workers on any machine share the partitions. It commits a partition's offset only once its own
pipeline acknowledged the records before it; on a rebalance, records not yet acknowledged go to
the partition's next owner (at least once: they may have been delivered just before).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from changefeed.change import ALL, Change
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.feed import ChangeFeed
from changefeed.pipelines.debezium import DebeziumEncoder, change_from_debezium
from changefeed.pipelines.delta import dumps, to_delta
from changefeed.pipelines.redis_streams import change_from_dict
from changefeed.pipelines.sinks import Batch
from changefeed.redact import redact

log = logging.getLogger("changefeed.kafka")

FORMATS = ("change", "delta", "debezium")
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


def _check_template(template: str) -> None:
    try:
        template.format(**_PLACEHOLDERS)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(
            f"bad topic template {template!r} ({exc}): use text with {{table}}, {{schema}} or"
            " {name}"
        ) from None


def sink_from_spec(spec: str, *, fmt: str = "change", model: str | None = None) -> KafkaSink:
    """The `KafkaSink` of ``--sink kafka://HOST:PORT[,HOST:PORT]?topic=TEMPLATE``.

    ``kafka://USER:PASSWORD@HOST:PORT`` authenticates with SASL (``mechanism=`` PLAIN by
    default, or SCRAM-SHA-256/512) over plaintext; ``kafkas://`` uses TLS. ``timeout=SECONDS``
    bounds how long a batch may wait for the broker (default 30). Other query parameters are
    librdkafka settings (``?compression.type=zstd``).
    """
    parts = urlsplit(spec)
    if not parts.hostname:
        raise ConfigurationError(f"a Kafka sink needs brokers: kafka://HOST:PORT?topic=NAME, not"
                                 f" {redact(spec)!r}")
    params = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    topic = params.pop("topic", "{table}")
    mechanism = params.pop("mechanism", "PLAIN")
    timeout = params.pop("timeout", "30")
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigurationError(f"timeout must be a number of seconds, not {timeout!r}")
    config: dict[str, Any] = dict(params)
    secure = parts.scheme.lower() == "kafkas"
    if parts.username:
        config.update({
            "security.protocol": "SASL_SSL" if secure else "SASL_PLAINTEXT",
            "sasl.mechanism": mechanism,
            "sasl.username": parts.username,
            "sasl.password": parts.password or "",
        })
    elif secure:
        config["security.protocol"] = "SSL"
    brokers = parts.netloc.rpartition("@")[2]
    return KafkaSink(brokers, topic, fmt=fmt, model=model, config=config, timeout=seconds,
                     label=redact(spec))


class KafkaSink:
    """Produce each change of a batch to its table's topic; return once Kafka confirmed them all.

    Args:
        bootstrap: ``host:port[,host:port]``.
        topic: topic template: ``{table}`` (default), ``{schema}``, ``{name}``; ``cdc.{table}``.
        fmt: record value: ``change`` (default; what `KafkaFeed` reads), ``delta`` or ``debezium``.
        model: the model name of deltas.
        config: more librdkafka producer settings (they win over the defaults).
        timeout: seconds a batch may wait for the broker's confirmations (retrying meanwhile).
    """

    accepts = "changes"

    def __init__(
        self,
        bootstrap: str,
        topic: str = "{table}",
        *,
        fmt: str = "change",
        model: str | None = None,
        config: dict[str, Any] | None = None,
        timeout: float = 30.0,
        label: str | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise ConfigurationError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
        _check_template(topic)
        self.bootstrap = bootstrap
        self.topic = topic
        self.fmt = fmt
        self.model = model
        self.timeout = timeout
        self.config = dict(config or {})
        self.name = f"kafka({label or bootstrap}, topic={topic})"
        self._debezium = DebeziumEncoder() if fmt == "debezium" else None
        self._producer: Producer | None = None
        self._topics: dict[str, str] = {}

    @property
    def producer(self) -> Producer:
        if self._producer is None:  # opened on first use, in the process that delivers
            settings: dict[str, Any] = {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,  # implies acks=all and ordered retries
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": int(self.timeout * 1000),
                "retry.backoff.ms": 100,
                "retry.backoff.max.ms": 2000,
                "client.id": f"changefeed-{socket.gethostname()}-{os.getpid()}",
                "error_cb": self._on_error,
                # librdkafka's own log repeats every failed connection; error_cb says it once.
                "log_level": 0,
            }
            settings.update(self.config)
            self._producer = Producer(settings)
        return self._producer

    def _on_error(self, error: KafkaError) -> None:
        # Brokers down and similar: librdkafka keeps retrying; the batch's bound decides.
        _warn_once(self, error)

    def record(self, change: Change, position: Any) -> tuple[str, bytes | None, bytes, list]:
        """The topic, key, value and headers of ``change``'s record."""
        topic = self._topics.get(change.table)
        if topic is None:
            topic = self._topics[change.table] = topic_for(self.topic, change.table)
        if self._debezium is not None:
            key = self._debezium.key_bytes(change)
            value = dumps(self._debezium(change))
        else:
            key = dumps(change.key) if change.key is not None else None
            item = change.to_dict() if self.fmt == "change" else to_delta(change, self.model)
            value = dumps(item)
        headers = [
            ("operation", (change.operation.name or "").lower().encode()),
            ("table", change.table.encode()),
            ("position", dumps(position)),
            ("format", self.fmt.encode()),
        ]
        version = (change.meta or {}).get("schema_version")
        if version is not None:
            headers.append(("schema_version", str(version).encode()))
        return topic, key, value, headers

    def write_batch(self, batch: Batch) -> None:
        producer = self.producer
        failures: list[str] = []

        def report(error: KafkaError | None, message: Any) -> None:
            if error is not None:
                failures.append(f"{message.topic()}: {error.str()}")

        deadline = time.monotonic() + self.timeout
        for item, position in zip(batch.items, batch.positions, strict=True):
            if not isinstance(item, Change):
                raise PipelineError(
                    f"{self.name} writes changes, got a {type(item).__name__}: choose the"
                    " record format with fmt= (--format) instead of a to_delta() stage"
                )
            topic, key, value, headers = self.record(item, position)
            self._produce(topic, key, value, headers, report, deadline)
            if self._debezium is not None and item.key is not None and item.new is None:
                # Debezium follows a delete with a tombstone, so compaction can drop the key.
                self._produce(topic, key, None, headers, report, deadline)
        remaining = producer.flush(max(deadline - time.monotonic(), 0.0) + 1.0)
        if failures or remaining:
            what = failures[0] if failures else f"{remaining} records still unconfirmed"
            raise PipelineError(
                f"{self.name}: Kafka did not confirm the batch within {self.timeout:g} s"
                f" ({len(failures) or remaining} of {len(batch)} records; {what})"
            )

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: list,
                 report: Any, deadline: float) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers,
                                      on_delivery=report)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"{self.name}: the producer's queue stayed full for {self.timeout:g} s"
                    ) from None
                self.producer.poll(0.1)

    def close(self) -> None:
        if self._producer is not None:
            # Every confirmed batch is flushed already; what is left belongs to a failed batch,
            # which was not acknowledged and is sent again by the next run: no long wait here.
            self._producer.flush(min(self.timeout, 5.0))
            self._producer = None


class KafkaFeed(ChangeFeed):
    """The changes in Kafka topics, read through a consumer group shared with other workers.

    Args:
        bootstrap: ``host:port[,host:port]``.
        topics: the topics to read (a name or a list).
        group: the consumer group; workers in one group share the partitions.
        config: more librdkafka consumer settings: ``session.timeout.ms`` (how soon a dead
            worker's partitions move to the others; librdkafka's default is 45 s), and
            ``max.poll.interval.ms`` (default 300 s), which must exceed the longest time the
            pipeline may take to deliver one batch, or the worker is dropped from the group.
        poll: seconds a poll waits before the feed reports a quiet moment.
        Other arguments as for `ChangeFeed` (``operation`` filters; other records are
        committed without being emitted).

    A change read back has ``"topic:partition:offset"`` as its position (what this feed
    acknowledges) and its source position in ``meta["source_position"]``.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: str | list[str],
        group: str,
        operation: int = ALL,
        *,
        config: dict[str, Any] | None = None,
        poll: float = 0.5,
        **options: Any,
    ) -> None:
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        options.setdefault("name", f"{','.join(self.topics)}/{group}")
        super().__init__(",".join(self.topics), operation, connection=bootstrap, **options)
        self.bootstrap = bootstrap
        self.group = group
        self.config = dict(config or {})
        self.poll = poll
        self._consumer: Consumer | None = None
        # Emitted records in order: (position, partition, offset, epoch when emitted).
        self._order: deque[tuple[str, tuple[str, int], int, int]] = deque()
        self._epoch = 0
        self._revoked_at: dict[tuple[str, int], int] = {}

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, KafkaException):
            error = exc.args[0] if exc.args else None
            return isinstance(error, KafkaError) and not error.fatal()
        return super().is_transient(exc)

    def _open(self) -> Consumer:
        settings: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "group.id": self.group,
            "enable.auto.commit": False,  # offsets are committed once the pipeline delivered
            "auto.offset.reset": "earliest",
            "error_cb": self._on_error,
            "log_level": 0,  # errors come through error_cb and poll()
        }
        settings.update(self.config)
        consumer = Consumer(settings)
        consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked,
                           on_lost=self._revoked)
        return consumer

    def _on_error(self, error: KafkaError) -> None:
        _warn_once(self, error)

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: assigned %s", self.name, _names(partitions))

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Records of these partitions emitted but not acknowledged belong to the next owner now:
        # their offsets are not committed (those emitted from now on have the new epoch).
        self._epoch += 1
        for tp in partitions:
            self._revoked_at[(tp.topic, tp.partition)] = self._epoch
        log.info("%s: revoked %s", self.name, _names(partitions))

    def run_changefeed(self) -> Iterator[Change | None]:
        self.close()
        self._order.clear()
        self._consumer = consumer = self._open()
        while True:
            message = consumer.poll(self.poll)
            if message is None:
                yield None
                continue
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                _warn_once(self, error)  # librdkafka retries by itself
                yield None
                continue
            partition = (message.topic(), message.partition())
            position = f"{partition[0]}:{partition[1]}:{message.offset()}"
            self._order.append((position, partition, message.offset(), self._epoch))
            change = self._decode(message)
            if change is None or not change.operation & self.operation:
                continue  # committed with the next acknowledged record
            meta = {**(change.meta or {}), "source_position": change.position}
            yield Change(change.operation, change.table, new=change.new, old=change.old,
                         key=change.key, position=position, committed_at=change.committed_at,
                         transaction=change.transaction, snapshot=change.snapshot, meta=meta)

    def _decode(self, message: Any) -> Change | None:
        value = message.value()
        if value is None:
            return None  # a tombstone
        where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
        fmt = (dict(message.headers() or []).get("format") or b"change").decode(errors="replace")
        if fmt not in ("change", "debezium"):
            raise PipelineError(f"{where} holds a {fmt!r} record: KafkaFeed reads records"
                                " written with format change or debezium")
        try:
            data = orjson.loads(value)
            if fmt == "change":
                return change_from_dict(data)
            return change_from_debezium(data, orjson.loads(message.key() or b"null"))
        except (ValueError, PipelineError) as exc:
            raise PipelineError(f"{where} is not a {fmt} record: {exc}") from exc

    def on_acknowledge(self, position: Any) -> None:
        """Commit, per partition, the offset after the last record acknowledged up to
        ``position``."""
        if not any(entry[0] == position for entry in self._order):
            return  # already committed, or from before a reconnect
        offsets: dict[tuple[str, int], int] = {}
        while self._order:
            emitted, partition, offset, epoch = self._order.popleft()
            if self._revoked_at.get(partition, 0) <= epoch:  # not revoked since it was read
                offsets[partition] = offset + 1
            if emitted == position:
                break
        if not offsets or self._consumer is None:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:  # e.g. a rebalance meanwhile: the records come again
            log.warning("%s: could not commit offsets: %s", self.name, exc)

    def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            try:
                consumer.close()  # leaves the group, so the others take over at once
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: closing the consumer: %s", self.name, exc)


def _warn_once(owner: Any, error: KafkaError) -> None:
    """Log ``error`` unless it repeats the one before (librdkafka reports each retry)."""
    text = error.str()
    if getattr(owner, "_last_error", None) != text:
        owner._last_error = text
        log.warning("%s: %s", owner.name, text)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


__all__ = ["FORMATS", "KafkaFeed", "KafkaSink", "sink_from_spec", "topic_for"]
