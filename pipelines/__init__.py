"""Pipelines: stages and sinks that turn changes into delivered deltas.

    feed -> stages -> sink

A `Pipeline` reads a feed, runs each change through stages (`where`, `project`, `to_delta`,
`route`, `subscription`, or any function), hands the results to a sink in batches
(``batch_size``, ``batch_seconds``), and acknowledges a change's position only once the sink
confirmed it: delivery is at least once, in both the in-process mode (the default) and the
multi-process mode (`own_process`, ``processes=True``). The README's "Compose a pipeline in
Python" walks through it. Users import all of it from `changefeed`; this package is where it
lives.

Every sink is importable from here. Those that need an optional driver (`WebhookSink` and
`SnorkySink`: ``http``; `RedisStreamSink`: ``redis``; `KafkaSink`: ``kafka``) are loaded only
when first used. The feeds that read a Redis stream or Kafka topics back are sources, in
``changefeed.backends.redis_streams`` and ``changefeed.backends.kafka``.
"""

import importlib
from typing import Any

from changefeed.formats.delta import ToDelta
from changefeed.pipelines.filters import compile_filter
from changefeed.pipelines.pipeline import Pipeline
from changefeed.pipelines.sinks import Batch, BatchSink, CallbackSink, JsonLinesSink, Sink
from changefeed.pipelines.sinks.spec import sink_from_spec
from changefeed.pipelines.stages import (
    BatchPolicy,
    OwnProcess,
    Project,
    Route,
    Stage,
    Subscription,
    Where,
    batch,
    own_process,
    project,
    route,
    subscription,
    to_delta,
    where,
)

_OPTIONAL_SINKS = {
    "KafkaSink": "changefeed.pipelines.sinks.kafka",
    "RedisStreamSink": "changefeed.pipelines.sinks.redis",
    "SnorkySink": "changefeed.pipelines.sinks.http",
    "WebhookSink": "changefeed.pipelines.sinks.http",
}


def __getattr__(name: str) -> Any:
    module = _OPTIONAL_SINKS.get(name)
    if module is not None:  # imported on first use: its driver is an optional extra
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Batch",
    "BatchPolicy",
    "BatchSink",
    "CallbackSink",
    "JsonLinesSink",
    "KafkaSink",
    "OwnProcess",
    "Pipeline",
    "Project",
    "RedisStreamSink",
    "Route",
    "Sink",
    "SnorkySink",
    "Stage",
    "Subscription",
    "ToDelta",
    "WebhookSink",
    "Where",
    "batch",
    "compile_filter",
    "own_process",
    "project",
    "route",
    "sink_from_spec",
    "subscription",
    "to_delta",
    "where",
]
