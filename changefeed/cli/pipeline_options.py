"""``changefeed run``'s pipeline options: the pipeline its ``--where``, ``--filter``, ``--sink``,
``--dead-letter``, ``--format`` and ``--processes`` make::

    pipeline = build_cli_pipeline(feed, where=..., filter=..., sink=..., dead_letter=...,
                                  fmt="delta", model=None)
    deliver(feed, pipeline.output(), ...)      # as `changefeed.cli.run` does

``--sink SPEC`` and ``--dead-letter SPEC`` name a sink (`sink_from_spec`, whose module lists
the forms). ``--where EXPR`` and ``--filter JSON`` filter rows
(`changefeed.pipelines.where_expressions`).

``--format`` names one of the formats of `changefeed.formats.registry`: ``delta`` (default) sends
Snorky deltas, ``change`` the whole change, ``debezium`` Debezium's envelope. A Snorky sink always
receives deltas and a Redis stream always holds whole changes (its readers apply their own
stages), whatever the format; a Kafka sink writes each record in the format given.
"""

from __future__ import annotations

from typing import Any

from changefeed.cli.common import ACK_SECONDS
from changefeed.errors import ConfigurationError
from changefeed.formats.registry import FormatOptions, format_named
from changefeed.pipelines.pipeline import Pipeline
from changefeed.pipelines.sinks.spec import sink_from_spec
from changefeed.pipelines.stages import subscription
from changefeed.pipelines.where_expressions import parse_filter, parse_where, row_filter


def build_cli_pipeline(
    feed: Any,
    *,
    where: str | None = None,
    filter: str | None = None,
    sink: str = "-",
    dead_letter: str | None = None,
    fmt: str = "delta",
    model: str | None = None,
    processes: bool = False,
) -> Pipeline:
    """The pipeline ``changefeed run`` runs: ``--where``, then ``--filter``, then the format.

    Acknowledges at most every `changefeed.cli.ACK_SECONDS` (and always at the end), as the
    command does without a pipeline.
    """
    out = sink_from_spec(sink, model=model, fmt=fmt)
    stages: list[Any] = []
    if where:
        stages.append(row_filter(parse_where(where)))
    if filter:
        stages.append(subscription(parse_filter(filter)))
    # A sink that takes one kind of item says so (Snorky: deltas; Redis and Kafka: changes).
    if out.accepts == "any":
        connection = getattr(feed, "connection", None)
        url = connection if isinstance(connection, str) else ""
        stage = format_named(fmt).stage(FormatOptions(model=model, url=url))
        if stage is not None:
            stages.append(stage)
    letters = sink_from_spec(dead_letter, option="--dead-letter") if dead_letter else None
    if letters is not None and letters.accepts != "any":
        raise ConfigurationError(
            f"--dead-letter {dead_letter!r}: dead letters are JSON records; send them to a file,"
            " stdout or a webhook"
        )
    return Pipeline(
        feed, stages, sink=out, dead_letter=letters, processes=processes, ack_interval=ACK_SECONDS
    )
