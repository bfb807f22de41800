"""changefeed: database change streams as composable pipelines of deltas.

Everything a user composes is importable from here: feeds (`get_changefeed`, `ChangeFeed` and
the backends' feeds), `Pipeline` with its stages and sinks, channels, typed rows, the values a
feed produces (`Change`, `Message`, `Operation`), the errors, checkpoints and `Retry`; the
modules behind them are free to move. `testing` holds an in-memory feed and a list sink.

    >>> from changefeed import ChangeFeed, get_changefeed
    >>> with get_changefeed("postgresql://localhost/app", "tasks",
    ...                     ChangeFeed.INSERT | ChangeFeed.UPDATE) as feed:   # doctest: +SKIP
    ...     for change in feed:
    ...         print(change.operation, change.new)

The core is imported at once; pipeline and backend names load on first use, so that
``import changefeed`` stays quick and imports no database driver (each is an optional extra).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# ``implementation``: "c" where the compiled hot path runs, "python" where the pure-Python code
# does (no extension built, or CHANGEFEED_IMPL=python).
from changefeed._speedups import implementation
from changefeed.change import ALL, UNCHANGED, Change, Operation, Position, SnapshotState, Truncate
from changefeed.checkpoint import CheckpointStore, FileCheckpoint, MemoryCheckpoint
from changefeed.delivery import FeedStats
from changefeed.errors import (
    BackendError,
    ChangefeedError,
    ConfigurationError,
    DecodeError,
    PermanentBackendError,
    PipelineError,
    ResumeError,
    TransientBackendError,
)
from changefeed.feed import ChangeFeed
from changefeed.message import Message
from changefeed.registry import get_changefeed
from changefeed.retry import Retry

if TYPE_CHECKING:  # what _LAZY loads on first use, spelled out for type checkers and readers
    from changefeed import testing
    from changefeed.backends.kafka import KafkaFeed
    from changefeed.backends.mongodb import MongoChangeFeed
    from changefeed.backends.postgres import PostgresChangeFeed
    from changefeed.backends.redis_streams import RedisStreamFeed
    from changefeed.backends.rethinkdb import RethinkChangeFeed
    from changefeed.pipelines import (
        Batch,
        BatchSink,
        CallbackSink,
        JsonLinesSink,
        OwnProcess,
        Project,
        Route,
        Sink,
        Stage,
        Subscription,
        ToDelta,
        Where,
        own_process,
        project,
        route,
        sink_from_spec,
        subscription,
        to_delta,
        where,
    )
    from changefeed.pipelines.channels import (
        CHANNEL_PREFIX,
        Channel,
        ChannelError,
        Notification,
        Receive,
        UnknownChannel,
        UnknownVersion,
        alembic,
        django,
        notify,
        receive,
    )
    from changefeed.pipelines.pipeline import Pipeline
    from changefeed.pipelines.sinks import SinkInterrupted
    from changefeed.pipelines.sinks.http import SnorkySink, WebhookSink
    from changefeed.pipelines.sinks.kafka import KafkaSink
    from changefeed.pipelines.sinks.redis import RedisStreamSink
    from changefeed.pipelines.typed import Typed, TypedChange, TypedRowError, typed

INSERT = Operation.INSERT
DELETE = Operation.DELETE
UPDATE = Operation.UPDATE
TRUNCATE = Operation.TRUNCATE

_LAZY: dict[str, str] = {
    # feeds: each imports its driver
    "PostgresChangeFeed": "changefeed.backends.postgres",
    "MongoChangeFeed": "changefeed.backends.mongodb",
    "RethinkChangeFeed": "changefeed.backends.rethinkdb",
    "KafkaFeed": "changefeed.backends.kafka",
    "RedisStreamFeed": "changefeed.backends.redis_streams",
    # pipelines, stages and sinks
    "Pipeline": "changefeed.pipelines.pipeline",
    **dict.fromkeys(
        ["Stage", "Where", "where", "Project", "project", "to_delta", "ToDelta",
         "Route", "route", "Subscription", "subscription", "OwnProcess", "own_process",
         "Sink", "BatchSink", "Batch", "JsonLinesSink", "CallbackSink", "sink_from_spec"],
        "changefeed.pipelines",
    ),
    # the HTTP, Redis and Kafka sinks import their drivers
    "WebhookSink": "changefeed.pipelines.sinks.http",
    "SnorkySink": "changefeed.pipelines.sinks.http",
    "RedisStreamSink": "changefeed.pipelines.sinks.redis",
    "KafkaSink": "changefeed.pipelines.sinks.kafka",
    "SinkInterrupted": "changefeed.pipelines.sinks",
    # channels and typed rows
    **dict.fromkeys(
        ["CHANNEL_PREFIX", "Channel", "ChannelError", "Notification", "Receive",
         "UnknownChannel", "UnknownVersion", "alembic", "django", "notify", "receive"],
        "changefeed.pipelines.channels",
    ),
    **dict.fromkeys(
        ["Typed", "TypedChange", "TypedRowError", "typed"], "changefeed.pipelines.typed"
    ),
}
"""The names loaded on first use, and the module each comes from."""

_SUBMODULES = frozenset({"testing"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without calling this again
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ALL",
    "CHANNEL_PREFIX",
    "DELETE",
    "INSERT",
    "TRUNCATE",
    "UNCHANGED",
    "UPDATE",
    "BackendError",
    "Batch",
    "BatchSink",
    "CallbackSink",
    "Change",
    "ChangeFeed",
    "ChangefeedError",
    "Channel",
    "ChannelError",
    "CheckpointStore",
    "ConfigurationError",
    "DecodeError",
    "FeedStats",
    "FileCheckpoint",
    "JsonLinesSink",
    "KafkaFeed",
    "KafkaSink",
    "MemoryCheckpoint",
    "Message",
    "MongoChangeFeed",
    "Notification",
    "Operation",
    "OwnProcess",
    "PermanentBackendError",
    "Pipeline",
    "PipelineError",
    "Position",
    "PostgresChangeFeed",
    "Project",
    "Receive",
    "RedisStreamFeed",
    "RedisStreamSink",
    "ResumeError",
    "RethinkChangeFeed",
    "Retry",
    "Route",
    "Sink",
    "SinkInterrupted",
    "SnapshotState",
    "SnorkySink",
    "Stage",
    "Subscription",
    "ToDelta",
    "TransientBackendError",
    "Truncate",
    "Typed",
    "TypedChange",
    "TypedRowError",
    "UnknownChannel",
    "UnknownVersion",
    "WebhookSink",
    "Where",
    "alembic",
    "django",
    "get_changefeed",
    "implementation",
    "notify",
    "own_process",
    "project",
    "receive",
    "route",
    "sink_from_spec",
    "subscription",
    "testing",
    "to_delta",
    "typed",
    "where",
]
