"""``changefeed run``'s pipeline options: the pipeline its ``--where``, ``--filter``, ``--sink``,
``--dead-letter``, ``--format`` and ``--processes`` make::

    pipeline = build_cli_pipeline(feed, where=..., filter=..., sink=..., dead_letter=...,
                                  fmt="delta", model=None)
    deliver(feed, pipeline.output(), ...)      # as `changefeed.cli.run` does

``--sink SPEC`` and ``--dead-letter SPEC`` name a sink (`sink_from_spec`, whose module lists
the forms). ``--where EXPR`` and ``--filter JSON`` filter rows
(`changefeed.pipelines.where_expressions`).

``--format delta`` (default) sends Snorky deltas, ``--format change`` the whole change,
``--format debezium`` Debezium's envelope (`changefeed.formats.debezium`). A Snorky sink always
receives deltas and a Redis stream always holds whole changes (its readers apply their own
stages), whatever the format; a Kafka sink writes each record in the format given.
"""

from __future__ import annotations

from typing import Any

from changefeed.cli.common import ACK_SECONDS
from changefeed.errors import ConfigurationError
from changefeed.pipelines.pipeline import Pipeline
from changefeed.pipelines.sinks.spec import sink_from_spec
from changefeed.pipelines.stages import subscription, to_delta
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
    if fmt == "delta" and out.accepts == "any":
        stages.append(to_delta(model))
    if fmt == "debezium" and out.accepts == "any":
        from changefeed.formats.debezium import DebeziumEncoder, Source, database_of

        connection = getattr(feed, "connection", None)
        url = connection if isinstance(connection, str) else ""
        stages.append(DebeziumEncoder(Source(database=database_of(url))))
    letters = sink_from_spec(dead_letter, option="--dead-letter") if dead_letter else None
    if letters is not None and letters.accepts != "any":
        raise ConfigurationError(
            f"--dead-letter {dead_letter!r}: dead letters are JSON records; send them to a file,"
            " stdout or a webhook"
        )
    return Pipeline(
        feed, stages, sink=out, dead_letter=letters, processes=processes, ack_interval=ACK_SECONDS
    )
