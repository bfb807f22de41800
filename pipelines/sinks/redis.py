"""The Redis Streams sink: changes appended to a stream that workers on many machines share.

    database feed --Pipeline--> RedisStreamSink --XADD--> stream
    stream --XREADGROUP--> RedisStreamFeed (worker 1) --Pipeline--> stages -> sink
                       \\--> RedisStreamFeed (worker 2) --Pipeline--> stages -> sink

The producer's pipeline acknowledges a database position once its change is in the stream
(XADD answered), so the stream holds every change at least once. The workers read it with
`changefeed.backends.redis_streams.RedisStreamFeed`; the entry's fields are in
`changefeed.formats.records`. How durable the stream is depends on Redis's persistence
settings (``appendonly yes``, ``appendfsync``).
"""

from __future__ import annotations

import threading

import redis

from changefeed.change import Change, Truncate
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.formats.records import stream_entry
from changefeed.pipelines.sinks import Batch, RemoteSink, Retryable
from changefeed.redact import redact
from changefeed.retry import Retry


class RedisStreamSink(RemoteSink):
    """XADD each change of a batch to ``stream``, in one round trip per batch.

    Put it where the items are still changes (before ``to_delta()``); workers reading the
    stream with `RedisStreamFeed` apply their own stages. A `Truncate` is an entry like a
    change. ``maxlen`` caps the stream (approximately)
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
        self.retry = retry if retry is not None else self.default_retry
        self.name = f"redis_stream({stream})"
        self._client: redis.Redis | None = None
        self._interrupted = threading.Event()

    def __repr__(self) -> str:
        return f"<RedisStreamSink {self.shown_url} stream={self.stream}>"

    def _open_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def write_batch(self, batch: Batch) -> None:
        for item in batch.items:
            if not isinstance(item, (Change, Truncate)):
                raise PipelineError(
                    f"{self.name} stores changes, got a {type(item).__name__}: put stages that"
                    " turn changes into deltas in the pipelines that read the stream"
                )
        self.retrying(lambda: self._xadd(batch), f"Redis at {self.shown_url}")

    def _xadd(self, batch: Batch) -> None:
        """One attempt: the whole batch in one round trip; `Retryable` if the connection failed."""
        pipe = self.client.pipeline(transaction=False)
        for item, position in zip(batch.items, batch.positions, strict=True):
            pipe.xadd(
                self.stream,
                stream_entry(item, position),
                maxlen=self.maxlen,
                approximate=True,
            )
        try:
            pipe.execute()
        except redis.AuthenticationError as exc:
            raise PipelineError(
                f"Redis at {self.shown_url} refused the credentials: {redact(str(exc))}"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Retryable(redact(f"{type(exc).__name__}: {exc}")) from exc
        except redis.RedisError as exc:  # an answer: sending it again cannot change it
            raise PipelineError(
                f"Redis at {self.shown_url} refused the batch: {redact(str(exc))}"
            ) from exc


__all__ = ["RedisStreamSink"]
