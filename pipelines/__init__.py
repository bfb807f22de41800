"""Pipelines: stages and sinks that turn changes into delivered deltas.

    feed -> stages -> sink

A `Pipeline` reads a feed, runs each change through plain-function stages (`where`, `project`,
`to_delta`, `route`, `subscription`, `batch`), hands the results to a sink, and acknowledges a
change's position only once the sink confirmed it: delivery is at least once, in both the
in-process mode (the default) and the multi-process mode (`own_process`, ``processes=True``).
The README's "Compose a pipeline in Python" walks through it.

`KafkaSink` and `KafkaFeed` (``changefeed.pipelines.kafka``) are importable from here too; they
need the ``kafka`` extra (confluent-kafka), loaded only when first used.
"""

from typing import Any

from changefeed.pipelines.filters import compile_filter
from changefeed.pipelines.pipeline import Pipeline
from changefeed.pipelines.sinks import Batch, BatchSink, CallbackSink, JsonLinesSink
from changefeed.pipelines.stages import (
    BatchPolicy,
    batch,
    own_process,
    project,
    route,
    subscription,
    to_delta,
    where,
)

_KAFKA = ("KafkaFeed", "KafkaSink")


def __getattr__(name: str) -> Any:
    if name in _KAFKA:  # imported on first use: confluent-kafka is an optional extra
        from changefeed.pipelines import kafka

        return getattr(kafka, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Batch",
    "BatchPolicy",
    "BatchSink",
    "CallbackSink",
    "JsonLinesSink",
    "KafkaFeed",
    "KafkaSink",
    "Pipeline",
    "batch",
    "compile_filter",
    "own_process",
    "project",
    "route",
    "subscription",
    "to_delta",
    "where",
]
