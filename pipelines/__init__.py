"""Pipelines: stages and sinks that turn changes into delivered deltas.

    feed -> stages -> sink

A `Pipeline` reads a feed, runs each change through plain-function stages (`where`, `project`,
`to_delta`, `route`, `subscription`, `batch`), hands the results to a sink, and acknowledges a
change's position only once the sink confirmed it: delivery is at least once, in both the
in-process mode (the default) and the multi-process mode (`own_process`, ``processes=True``).
The README's "Compose a pipeline in Python" walks through it.
"""

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

__all__ = [
    "Batch",
    "BatchPolicy",
    "BatchSink",
    "CallbackSink",
    "JsonLinesSink",
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
