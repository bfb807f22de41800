"""The Kafka sink: keyed, ordered change records for every tool that reads Kafka.

    database feed --Pipeline--> KafkaSink --produce--> topic per table (key = primary key)

Each change is one record (see `changefeed.formats.records` for topic, key, value and
headers): every change of a row goes to the same partition, in commit order. A `Truncate` is
written to every partition of its table's topic (as the topic's metadata lists them when it is
sent), so that it sits in order with the changes of each partition. The producer is
idempotent (``enable.idempotence``: no duplicates or reordering from its own retries). A batch
counts as delivered only once the broker confirmed every record of it (delivery reports), so the
pipeline acknowledges a database position only after everything up to it is in Kafka: a crash
loses nothing and at worst repeats the last batch. While the broker is unreachable the producer
retries with backoff; after ``timeout`` seconds the batch fails with one clear error.

Workers read the topics back with `changefeed.backends.kafka.KafkaFeed`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from changefeed.change import Change, Truncate
from changefeed.errors import PipelineError
from changefeed.formats.records import Record, RecordEncoder, warn_once
from changefeed.pipelines.sinks import Batch, Sink

log = logging.getLogger("changefeed.kafka")


class KafkaSink(Sink):
    """Produce each change of a batch to its table's topic; return once Kafka confirmed them all.

    Args:
        bootstrap: ``host:port[,host:port]``.
        topic: topic template: ``{table}`` (default), ``{schema}``, ``{name}``; ``cdc.{table}``.
        fmt: record value: ``change`` (default; what `KafkaFeed` reads), ``delta`` or ``debezium``
            (each delete is then followed by a tombstone, as Debezium does).
        model: the model name of deltas.
        config: more librdkafka producer settings (they win over the defaults).
        timeout: seconds a batch may wait for the broker's confirmations (retrying meanwhile).
        label: how the sink's name shows the brokers (default ``bootstrap``; the CLI gives its
            ``--sink`` value without secrets).
    """

    accepts = "changes"

    def __init__(
        self,
        bootstrap: str,
        topic: str = "{table}",
        *,
        fmt: str = "change",
        model: str | Mapping[str, str] | None = None,
        config: dict[str, Any] | None = None,
        timeout: float = 30.0,
        label: str | None = None,
    ) -> None:
        self.encoder = RecordEncoder(topic, fmt, model)
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self.config = dict(config or {})
        self.name = f"kafka({label or bootstrap}, topic={topic})"
        self._producer: Producer | None = None

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
        warn_once(self, error, log)

    def write_batch(self, batch: Batch) -> None:
        producer = self.producer
        failures: list[str] = []

        def report(error: KafkaError | None, message: Any) -> None:
            if error is not None:
                failures.append(f"{message.topic()}: {error.str()}")

        deadline = time.monotonic() + self.timeout
        for item, position in zip(batch.items, batch.positions, strict=True):
            if not isinstance(item, (Change, Truncate)):
                raise PipelineError(
                    f"{self.name} writes changes, got a {type(item).__name__}: choose the"
                    " record format with fmt= (--format) instead of a to_delta() stage"
                )
            for record in self.encoder.records(item, position):
                self._produce(record, report, deadline)
        remaining = producer.flush(max(deadline - time.monotonic(), 0.0) + 1.0)
        if failures or remaining:
            what = failures[0] if failures else f"{remaining} records still unconfirmed"
            raise PipelineError(
                f"{self.name}: Kafka did not confirm the batch within {self.timeout:g} s"
                f" ({len(failures) or remaining} of {len(batch)} records; {what})"
            )

    def _produce(self, record: Record, report: Any, deadline: float) -> None:
        if record.every_partition:
            for partition in self._partitions(record.topic, deadline):
                self._produce_one(record, report, deadline, partition)
        else:
            self._produce_one(record, report, deadline)

    def _partitions(self, topic: str, deadline: float) -> list[int | None]:
        """The partitions of ``topic`` now (asked each time: truncates are rare, partitions may
        have been added); ``[None]`` (the partitioner's choice) for a topic that does not exist
        yet, which then holds no record to be ordered with."""
        try:
            metadata = self.producer.list_topics(
                topic, timeout=max(deadline - time.monotonic(), 1.0)).topics.get(topic)
        except KafkaException as exc:
            raise PipelineError(f"{self.name}: cannot read the partitions of {topic}: {exc}") \
                from exc
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return [None]
        return sorted(metadata.partitions)

    def _produce_one(
        self, record: Record, report: Any, deadline: float, partition: int | None = None
    ) -> None:
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(  # (str, bytes) headers: the stub's list is invariant
                    record.topic, value=record.value, key=record.key,
                    headers=record.headers, on_delivery=report, **extra,  # type: ignore[arg-type]
                )
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


__all__ = ["KafkaSink"]
