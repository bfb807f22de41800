"""Helpers of the Kafka tests (sink and feed): topics, reading them, consumer-group settings.

The tests run against Tansu started by the test setup, or CHANGEFEED_TEST_KAFKA_BOOTSTRAP.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from waiting import wait_until

from changefeed.testing import delete, insert, update

FAST_GROUP = {"session.timeout.ms": 6000, "max.poll.interval.ms": 6000,
              "heartbeat.interval.ms": 500}
"""Consumer-group settings that make joins and takeovers take seconds instead of ~25 s."""


def new_table() -> str:
    return f"public.t_{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[
        topic
    ].result(30)


def read_topic(bootstrap: str, topic: str, until, timeout: float = 60) -> list[Any]:
    """Every record of ``topic`` from the start (no group: partitions assigned directly), read
    until ``until(records)`` holds or ``timeout`` passes."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader",
                         "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        partitions: list[int] = []
        while not partitions and time.monotonic() < deadline:
            metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
            partitions = list(metadata.partitions) if metadata and not metadata.error else []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Any] = []
        while not until(records) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                records.append(message)
        return records
    finally:
        consumer.close()


def changes_of(table: str) -> list:
    return [
        insert(table, {"id": 1, "title": "one"}, key={"id": 1}, position=1),
        insert(table, {"id": 2, "title": "two"}, key={"id": 2}, position=2),
        update(table, {"id": 1, "title": "uno"}, {"id": 1}, key={"id": 1}, position=3),
        delete(table, {"id": 2}, key={"id": 2}, position=4),
        update(table, {"id": 1, "title": "eins"}, {"id": 1}, key={"id": 1}, position=5),
    ]


def wait_for_commits(bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> bool:
    """Whether ``group``'s committed offsets reach ``ends`` (partition: offset): fails the test
    if they do not within 30 s."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        wanted = [TopicPartition(topic, p) for p in sorted(ends)]
        return wait_until(lambda: [tp.offset for tp in consumer.committed(wanted, timeout=10)]
                          == [ends[p] for p in sorted(ends)], f"{group}'s commits", 30, step=0.2)
    finally:
        consumer.close()
