"""Redis Streams: one change stream shared by workers on many machines.

    database feed --Pipeline--> RedisStreamSink --XADD--> stream
    stream --XREADGROUP--> RedisStreamFeed (worker 1) --Pipeline--> stages -> sink
                       \\--> RedisStreamFeed (worker 2) --Pipeline--> stages -> sink

The producer's pipeline acknowledges a database position once its change is in the stream
(XADD answered), so the stream holds every change at least once. Each worker reads through one
consumer group, so every entry goes to one worker; a worker's pipeline acknowledges (XACK) an
entry only after its own sink delivered it. Entries a worker read but never acknowledged stay
in the group's pending list: the worker takes its own back when it restarts under the same
consumer name, and the other workers claim them (XAUTOCLAIM) once they have been idle for
``claim_idle`` seconds, so a dead worker's share is not lost. Delivery stays at least once: a
claimed entry may have been delivered by the dead worker just before it died.

Stream entries hold the change as JSON (``Change.to_dict()``) in the field ``change`` and its
source position in ``position``. A change read back has the stream entry id as its position
(what this feed acknowledges) and the source position in ``meta["source_position"]``. JSON
turns Decimals, datetimes inside rows, UUIDs and bytes into strings; ``committed_at`` and
`UNCHANGED` columns are restored. How durable the stream is depends on Redis's persistence
settings (``appendonly yes``, ``appendfsync``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import redis

from changefeed.change import ALL, UNCHANGED, Change, Operation
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.feed import ChangeFeed, Retry
from changefeed.pipelines.delta import dumps
from changefeed.pipelines.sinks import Batch, RemoteSink, SinkInterrupted
from changefeed.redact import redact

log = logging.getLogger("changefeed.pipelines")


def change_to_fields(change: Change, position: Any) -> dict[str, bytes]:
    """The stream entry of ``change``: its JSON and its source position."""
    return {"change": dumps(change.to_dict()), "position": dumps(position)}


def change_from_dict(data: dict[str, Any]) -> Change:
    """Rebuild a `Change` from its ``to_dict()`` form (after a JSON round trip)."""
    try:
        operation = Operation[str(data["operation"]).upper()]
        new = data.get("new")
        if new is not None and data.get("unchanged"):
            new = {**new, **dict.fromkeys(data["unchanged"], UNCHANGED)}
        committed_at = data.get("committed_at")
        if isinstance(committed_at, str):
            committed_at = datetime.fromisoformat(committed_at)
        return Change(
            operation,
            data["table"],
            new=new,
            old=data.get("old"),
            key=data.get("key"),
            position=data.get("position"),
            committed_at=committed_at,
            transaction=data.get("transaction"),
            snapshot=bool(data.get("snapshot", False)),
            meta=data.get("meta"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"not a change: {str(data)[:200]} ({exc})") from exc


class RedisStreamSink(RemoteSink):
    """XADD each change of a batch to ``stream``, in one round trip per batch.

    Put it where the items are still changes (before ``to_delta()``); workers reading the stream
    with `RedisStreamFeed` apply their own stages. ``maxlen`` caps the stream (approximately)
    so it does not grow forever: set it well above what consumers may lag behind.

    A connection error (refused, reset, timed out) is retried with exponential backoff and
    jitter (``retry``; default 8 attempts, 0.5 s doubling to 30 s) before the batch fails. A
    batch cut off mid-way is sent whole again, so its first entries may be in the stream twice
    (delivery is at least once; entries carry their source position to drop duplicates).
    """

    accepts = "changes"

    def __init__(
        self, url: str, stream: str, *, maxlen: int | None = None, retry: Retry | None = None
    ) -> None:
        if not stream:
            raise ConfigurationError("RedisStreamSink needs a stream name")
        self.url = url
        self.shown_url = redact(url)
        self.stream = stream
        self.maxlen = maxlen
        self.retry = retry if retry is not None else Retry(initial=0.5, maximum=30.0, attempts=8)
        self.name = f"redis_stream({stream})"
        self._client: redis.Redis | None = None
        self._interrupted = threading.Event()

    def __repr__(self) -> str:
        return f"<RedisStreamSink {self.shown_url} stream={self.stream}>"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # opened on first use, in the process that delivers
            self._client = redis.Redis.from_url(self.url)
        return self._client

    def write_batch(self, batch: Batch) -> None:
        for item in batch.items:
            if not isinstance(item, Change):
                raise PipelineError(
                    f"{self.name} stores changes, got a {type(item).__name__}: put stages that"
                    " turn changes into deltas in the pipelines that read the stream"
                )
        failures = 0
        while True:
            if self._interrupted.is_set():
                raise SinkInterrupted(f"{self.name}: stopped before the batch was delivered")
            try:
                self._xadd(batch)
                return
            except redis.AuthenticationError as exc:
                raise PipelineError(
                    f"Redis at {self.shown_url} refused the credentials: {redact(str(exc))}"
                ) from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failures += 1
                self._retry_or_give_up(failures, redact(f"{type(exc).__name__}: {exc}"), exc,
                                       f"Redis at {self.shown_url}", self.name)
            except redis.RedisError as exc:  # an answer: sending it again cannot change it
                raise PipelineError(
                    f"Redis at {self.shown_url} refused the batch: {redact(str(exc))}"
                ) from exc

    def _xadd(self, batch: Batch) -> None:
        pipe = self.client.pipeline(transaction=False)
        for item, position in zip(batch.items, batch.positions, strict=True):
            pipe.xadd(
                self.stream,
                change_to_fields(item, position),  # type: ignore[arg-type]
                maxlen=self.maxlen,
                approximate=True,
            )
        pipe.execute()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._interrupted.clear()


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
        self._unacked.clear()
        self._unacked_set.clear()
        # First what this consumer read before (a crash, a restart) and never acknowledged.
        cursor = "0"
        while True:
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
        if not fields or b"change" not in fields:  # trimmed or deleted meanwhile
            self.client.xack(self.stream, self.group, position)
            return
        change = change_from_dict(orjson.loads(fields[b"change"]))
        if not change.operation & self.operation:
            self.client.xack(self.stream, self.group, position)
            return
        meta = {**(change.meta or {}), "source_position": change.position}
        self._unacked.append(position)
        self._unacked_set.add(position)
        yield Change(
            change.operation,
            change.table,
            new=change.new,
            old=change.old,
            key=change.key,
            position=position,
            committed_at=change.committed_at,
            transaction=change.transaction,
            snapshot=change.snapshot,
            meta=meta,
        )

    def on_acknowledge(self, position: Any) -> None:
        """XACK every entry emitted up to and including ``position``."""
        done: list[str] = []
        if position in self._unacked_set:
            while self._unacked:
                entry_id = self._unacked.popleft()
                self._unacked_set.discard(entry_id)
                done.append(entry_id)
                if entry_id == position:
                    break
        else:
            done.append(position)
        self.client.xack(self.stream, self.group, *done)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
