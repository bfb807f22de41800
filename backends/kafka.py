"""Kafka as a source: change records in topics, read by workers sharing a consumer group.

    topics --consumer group--> KafkaFeed (worker 1) --Pipeline--> stages -> sink
                           \\--> KafkaFeed (worker 2) --Pipeline--> stages -> sink

`KafkaFeed` reads the topics a `changefeed.pipelines.sinks.kafka.KafkaSink` wrote (records in
the ``change`` or ``debezium`` format; see `changefeed.formats.records`) through a consumer
group, so workers on any machine share the partitions. It commits a partition's offset only once
its own pipeline acknowledged the records before it; on a rebalance, records not yet
acknowledged go to the partition's next owner (at least once: they may have been delivered just
before).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from changefeed.change import ALL, Change
from changefeed.feed import ChangeFeed
from changefeed.formats.records import change_of_record, read_back, warn_once

log = logging.getLogger("changefeed.kafka")


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
        # Offsets acknowledged but not committed yet: acknowledging only notes them, and the
        # stream loop, keep_alive(), a rebalance and close() commit them.
        self._acknowledged: dict[tuple[str, int], int] = {}

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, KafkaException):
            error = exc.args[0] if exc.args else None
            return isinstance(error, KafkaError) and not error.fatal()
        return super().is_transient(exc)

    def _consumer_of_group(self) -> Consumer:
        settings: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "group.id": self.group,
            "enable.auto.commit": False,  # offsets are committed once the pipeline delivered
            "auto.offset.reset": "earliest",
            "error_cb": self._on_error,
            "log_level": 0,  # errors come through error_cb and poll()
        }
        settings.update(self.config)
        return Consumer(settings)

    def _open(self) -> Consumer:
        consumer = self._consumer_of_group()
        consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked,
                           on_lost=self._revoked)
        return consumer

    def _on_error(self, error: KafkaError) -> None:
        warn_once(self, error, log)

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: assigned %s", self.name, _names(partitions))

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # What was acknowledged is committed while the partitions are still ours. Records
        # emitted but not acknowledged belong to the next owner now: their offsets are not
        # committed (those emitted from now on have the new epoch). Our own leaving (close)
        # is not such a move: what the pipeline acknowledges after it is still ours to commit.
        log.info("%s: revoked %s", self.name, _names(partitions))
        if self._consumer is None:
            return
        self._commit()
        self._epoch += 1
        for tp in partitions:
            self._revoked_at[(tp.topic, tp.partition)] = self._epoch

    def run_changefeed(self) -> Iterator[Change | None]:
        self.close()
        self._order.clear()
        self._consumer = consumer = self._open()
        while True:
            self._commit()
            message = consumer.poll(self.poll)
            if message is None:
                yield None
                continue
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                warn_once(self, error, log)  # librdkafka retries by itself
                yield None
                continue
            partition = (message.topic(), message.partition())
            position = f"{partition[0]}:{partition[1]}:{message.offset()}"
            self._order.append((position, partition, message.offset(), self._epoch))
            change = self._decode(message)
            if change is None or not change.operation & self.operation:
                continue  # committed with the next acknowledged record
            yield read_back(change, position)

    def _decode(self, message: Any) -> Change | None:
        where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
        return change_of_record(message.value(), message.key(), message.headers(), where)

    def on_acknowledge(self, position: Any) -> None:
        """Note, per partition, the offset after the last record acknowledged up to
        ``position`` (committed from the stream loop, `keep_alive`, a rebalance or `close`).
        Once the feed is closed (a pipeline delivers what the feed gave before it failed)
        nothing else will: then commit at once."""
        if not any(entry[0] == position for entry in self._order):
            return  # already noted, or from before a reconnect
        while self._order:
            emitted, partition, offset, epoch = self._order.popleft()
            if self._revoked_at.get(partition, 0) <= epoch:  # not revoked since it was read
                self._acknowledged[partition] = offset + 1
            if emitted == position:
                break
        if self._consumer is None and self._acknowledged:
            self._commit_after_close()

    def keep_alive(self) -> None:
        self._commit()

    def _commit(self, consumer: Consumer | None = None) -> None:
        """Commit the acknowledged offsets on ``consumer``, by default the open one (none:
        nothing to commit to)."""
        consumer = consumer or self._consumer
        if not self._acknowledged or consumer is None:
            return
        offsets, self._acknowledged = self._acknowledged, {}
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:  # e.g. a rebalance meanwhile: the records come again
            log.warning("%s: could not commit offsets: %s", self.name, exc)

    def _commit_after_close(self) -> None:
        """Commit the acknowledged offsets through a consumer of the group that does not join
        it. Kafka takes such a commit only while no worker is in the group; otherwise the
        records come again (at least once), from whichever worker owns them now."""
        consumer = self._consumer_of_group()
        try:
            self._commit(consumer)
        finally:
            consumer.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._commit()
            consumer, self._consumer = self._consumer, None
            try:
                consumer.close()  # leaves the group, so the others take over at once
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: closing the consumer: %s", self.name, exc)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


__all__ = ["KafkaFeed"]
