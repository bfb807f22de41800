"""Redis Streams as a source: the changes a `RedisStreamSink` put in a stream, shared by workers.

    stream --XREADGROUP--> RedisStreamFeed (worker 1) --Pipeline--> stages -> sink
                       \\--> RedisStreamFeed (worker 2) --Pipeline--> stages -> sink

Each worker reads through one consumer group, so every entry goes to one worker; a worker's
pipeline acknowledges (XACK) an entry only after its own sink delivered it. Entries a worker read
but never acknowledged stay in the group's pending list: the worker takes its own back when it
restarts under the same consumer name, and the other workers claim them (XAUTOCLAIM) once they
have been idle for ``claim_idle`` seconds, so a dead worker's share is not lost. Delivery stays
at least once: a claimed entry may have been delivered by the dead worker just before it died.

The producer side is `changefeed.pipelines.sinks.redis.RedisStreamSink`; how an entry holds a
change is in `changefeed.formats.records`. A change read back has the stream entry id as its
position (what this feed acknowledges) and the source position in ``meta["source_position"]``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import redis

from changefeed.change import ALL, Change
from changefeed.feed import ChangeFeed
from changefeed.formats.records import change_of_entry, read_back

log = logging.getLogger("changefeed.pipelines")


class RedisStreamFeed(ChangeFeed):
    """The changes in a Redis stream, read through a consumer group shared with other workers.

    Args:
        url: ``redis://host:port/db``.
        stream: the stream's key.
        group: the consumer group (created, with the stream, when missing).
        consumer: this worker's name in the group; keep it across restarts so the worker takes
            back what it had read but not acknowledged (default: ``hostname-pid``).
        count: entries read per call.
        block: seconds a read waits for new entries before the feed reports a quiet moment.
        claim_idle: seconds an entry must have been pending with another consumer before this
            one claims it (make it longer than a batch may take to deliver).
        start: where a newly created group starts: ``"0"`` (the whole stream) or ``"$"`` (only
            entries added from now on).
        Other arguments as for `ChangeFeed` (``operation`` filters; other entries are
        acknowledged without being emitted).
    """

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        consumer: str | None = None,
        operation: int = ALL,
        *,
        count: int = 100,
        block: float = 1.0,
        claim_idle: float = 30.0,
        start: str = "0",
        **options: Any,
    ) -> None:
        consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        options.setdefault("name", f"{stream}/{group}/{consumer}")
        super().__init__(stream, operation, connection=url, **options)
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.count = count
        self.block = block
        self.claim_idle = claim_idle
        self.start = start
        self._client: redis.Redis | None = None
        self._unacked: deque[str] = deque()
        self._unacked_set: set[str] = set()
        # Entries delivered (or skipped) but not XACKed yet: acknowledging only notes them, and
        # the stream loop, keep_alive() and close() tell Redis.
        self._delivered: deque[str] = deque()
        self._streaming = False
        self.claimed = 0
        """How many entries this feed claimed from other consumers."""

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        return self._client

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) or super().is_transient(
            exc
        )

    def run_changefeed(self) -> Iterator[Change | None]:
        client = self.client
        try:
            client.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.mark_connected()
        self._streaming = True
        self._unacked.clear()
        self._unacked_set.clear()
        self._xack_delivered()  # before reading our pending entries: those are not sent again
        # First what this consumer read before (a crash, a restart) and never acknowledged.
        cursor = "0"
        while True:
            self._xack_delivered()
            answer: Any = client.xreadgroup(
                self.group, self.consumer, {self.stream: cursor}, self.count
            )
            entries = answer[0][1] if answer else []
            if not entries:
                break
            for entry_id, fields in entries:
                cursor = entry_id
                yield from self._emit(entry_id, fields)
        last_claim = 0.0
        block_ms = max(1, int(self.block * 1000))
        while True:
            if time.monotonic() - last_claim >= min(self.claim_idle, 5.0):
                last_claim = time.monotonic()
                yield from self._claim()
            self._xack_delivered()
            answer = client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, self.count, block=block_ms
            )
            if not answer or not answer[0][1]:
                yield None
                continue
            for entry_id, fields in answer[0][1]:
                yield from self._emit(entry_id, fields)

    def _claim(self) -> Iterator[Change | None]:
        """Claim the entries other consumers left pending for longer than ``claim_idle``."""
        cursor: Any = "0-0"
        idle_ms = int(self.claim_idle * 1000)
        while True:
            answer: Any = self.client.xautoclaim(
                self.stream, self.group, self.consumer, idle_ms, cursor, count=self.count
            )
            cursor, entries = answer[0], answer[1]
            for entry_id, fields in entries:
                if _text(entry_id) in self._unacked_set:
                    continue  # ours, still on its way through our pipeline
                self.claimed += 1
                yield from self._emit(entry_id, fields)
            if _text(cursor) == "0-0":
                return

    def _emit(self, entry_id: bytes | str, fields: dict[bytes, bytes] | None) -> Iterator[Change]:
        position = _text(entry_id)
        change = change_of_entry(fields, f"{self.stream} entry {position}")
        if change is None or not change.operation & self.operation:
            # Trimmed or deleted meanwhile, or an operation this feed does not want.
            self._delivered.append(position)
            return
        self._unacked.append(position)
        self._unacked_set.add(position)
        yield read_back(change, position)

    def on_acknowledge(self, position: Any) -> None:
        """Note every entry emitted up to and including ``position`` as delivered: the stream
        loop, `keep_alive` or `close` XACK it. Once the feed is closed (a pipeline acknowledges
        its last batches after the feed ended) nothing else will: then XACK at once."""
        if position in self._unacked_set:
            while self._unacked:
                entry_id = self._unacked.popleft()
                self._unacked_set.discard(entry_id)
                self._delivered.append(entry_id)
                if entry_id == position:
                    break
        else:
            self._delivered.append(position)
        if not self._streaming:
            self._xack_delivered(self.client)

    def keep_alive(self) -> None:
        """XACK what was delivered, if the connection is up (a failure is left to the stream
        loop, which reconnects)."""
        try:
            self._xack_delivered()
        except redis.RedisError as exc:
            log.debug("%s: XACK from keep_alive failed: %s", self.name, exc)

    def _xack_delivered(self, client: redis.Redis | None = None) -> None:
        """XACK the delivered entries on ``client``, by default the open connection (none:
        they wait for the next)."""
        if client is None:
            client = self._client
        if client is None or not self._delivered:
            return
        entry_ids = [self._delivered.popleft() for _ in range(len(self._delivered))]
        try:
            client.xack(self.stream, self.group, *entry_ids)
        except redis.RedisError:
            self._delivered.extendleft(reversed(entry_ids))  # XACKed once a connection works
            raise

    def close(self) -> None:
        self._streaming = False
        if self._client is not None:
            try:
                self._xack_delivered()
            except redis.RedisError as exc:  # kept: XACKed first when the feed runs again
                log.warning("%s: could not acknowledge %d entries: %s", self.name,
                            len(self._delivered), exc)
            self._client.close()
            self._client = None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
