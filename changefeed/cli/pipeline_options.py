"""``changefeed run``'s pipeline options: the pipeline its ``--where``, ``--filter``, ``--stage``,
``--sink``, ``--dead-letter``, ``--format``, ``--processes`` and ``--workers`` make::

    pipeline = build_cli_pipeline(feed, where=..., filter=..., sink=..., dead_letter=...,
                                  fmt="delta", model=None)
    deliver(feed, pipeline.output(), ...)      # as `changefeed.cli.run` does

``changefeed serve`` builds the same parts (`pipeline_parts`) and puts its meters around the
sink. ``--sink SPEC`` and ``--dead-letter SPEC`` name a sink (`sink_from_spec`, whose module
lists the forms). ``--where EXPR`` and ``--filter JSON`` filter rows
(`changefeed.pipelines.where_expressions`); ``--stage MODULE:NAME`` adds a Python callable.

``--format`` names one of the formats of `changefeed.formats.registry`: ``delta`` (default) sends
Snorky deltas, ``change`` the whole change, ``debezium`` Debezium's envelope. A Snorky sink always
receives deltas and a Redis stream always holds whole changes (its readers apply their own
stages), whatever the format; a Kafka sink writes each record in the format given.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from changefeed.cli.common import ACK_SECONDS
from changefeed.errors import ConfigurationError
from changefeed.formats.registry import FormatOptions, format_named

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from changefeed.pipelines.pipeline import Pipeline
    from changefeed.pipelines.sinks import Sink
    from changefeed.pipelines.stages import Stage

_FLAGS = {"tables": "TABLE...", "fmt": "--format", "stages": "--stage"}


def cli_flag(option: str) -> str:
    """How ``changefeed run`` names a `changefeed.cli.run.RunOptions` field: ``--dead-letter``."""
    return _FLAGS.get(option) or "--" + option.replace("_", "-")


MAX_WORKERS = 64
"""The most copies of a stage's process ``--workers`` runs (more would only contend)."""


def workers_count(value: str | int) -> int:
    """``--workers``: a whole number from 1 to `MAX_WORKERS`, or ``auto``, the number of cores
    this process may run on. Raises `ConfigurationError` for anything else."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, _cores()))
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise ConfigurationError(
                f"workers must be a whole number from 1 to {MAX_WORKERS} or auto, not {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigurationError(
            f"workers must be a whole number from 1 to {MAX_WORKERS} or auto, not {value!r}")
    return value


def _cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


class OptionError(ConfigurationError):
    """A bad option: ``option`` names the `changefeed.cli.run.RunOptions` field to blame, so that
    ``changefeed serve`` can point at the config key (it is lost when the error is pickled)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@contextmanager
def blame(option: str) -> Iterator[None]:
    """Turn a `ConfigurationError` raised inside into an `OptionError` naming ``option``."""
    try:
        yield
    except OptionError:
        raise
    except ConfigurationError as exc:
        raise OptionError(exc.message, option) from exc


def load_stage(spec: str) -> Stage:
    """The callable ``MODULE:NAME`` names (``NAME`` may be dotted), imported now: a stage."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"stage {spec!r}: use MODULE:NAME, e.g. myapp.stages:enrich")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"stage {spec!r}: cannot import {module_name}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"stage {spec!r}: {module_name} has no {attribute}") from None
    if not callable(target):
        raise ConfigurationError(f"stage {spec!r} is not callable")
    return target


class PipelineOptions(TypedDict, total=False):
    """The options that make a pipeline's parts: `pipeline_parts`'s keywords, with its defaults."""

    where: str | None
    filter: str | None
    stages: Sequence[str]
    sink: str
    dead_letter: str | None
    fmt: str
    model: str | dict[str, str] | None


@dataclass
class PipelineParts:
    """What the pipeline options make: the stages in order, the stage that puts changes in the
    chosen format (None when the sink takes changes as they are), the sink, the dead letters."""

    stages: list[Any]
    encode: Stage | None
    sink: Sink
    dead_letter: Sink | None


def pipeline_parts(
    feed: Any,
    *,
    where: str | None = None,
    filter: str | None = None,
    stages: Sequence[str] = (),
    sink: str = "-",
    dead_letter: str | None = None,
    fmt: str = "delta",
    model: str | dict[str, str] | None = None,
    flag: Callable[[str], str] = cli_flag,
) -> PipelineParts:
    """``--where``, then ``--filter``, then each ``--stage``; the format; the sinks. Raises
    `OptionError` naming the option (``where``, ``filter``, ``stages``, ``sink``...);
    ``flag`` says how messages name an option."""
    # Imported here: ``changefeed run`` without a pipeline starts without them.
    from changefeed.pipelines.sinks.spec import sink_from_spec
    from changefeed.pipelines.stages import subscription
    from changefeed.pipelines.where_expressions import parse_filter, parse_where, row_filter

    with blame("sink"):
        out = sink_from_spec(sink, model=model, fmt=fmt, option=flag("sink"))
    steps: list[Any] = []
    if where:
        with blame("where"):
            steps.append(row_filter(parse_where(where)))
    if filter:
        with blame("filter"):
            steps.append(subscription(parse_filter(filter)))
    with blame("stages"):
        steps.extend(load_stage(spec) for spec in stages)
    # A sink that takes one kind of item says so (Snorky: deltas; Redis and Kafka: changes).
    encode: Stage | None = None
    if out.accepts == "any":
        connection = getattr(feed, "connection", None)
        url = connection if isinstance(connection, str) else ""
        with blame("fmt"):
            encode = format_named(fmt).stage(FormatOptions(model=model, url=url))
    with blame("dead_letter"):
        letters = (sink_from_spec(dead_letter, option=flag("dead_letter")) if dead_letter
                   else None)
        if letters is not None and letters.accepts != "any":
            raise ConfigurationError(
                f"{flag('dead_letter')} {dead_letter!r}: dead letters are JSON records; send them"
                " to a file, stdout or a webhook"
            )
    return PipelineParts(steps, encode, out, letters)


def build_cli_pipeline(
    feed: Any, *, processes: bool = False, workers: int = 1, **options: Unpack[PipelineOptions]
) -> Pipeline:
    """The pipeline ``changefeed run`` runs: ``--where``, ``--filter``, ``--stage``, the format
    (the keywords of `pipeline_parts`).

    Acknowledges at most every `changefeed.cli.ACK_SECONDS` (and always at the end), as the
    command does without a pipeline. A sink writing JSON lines gets them made by the format's
    line encoder (`EncodeLines`: no item per change). With ``processes`` each stage but
    ``--where`` (cheaper than a crossing) runs in a process of its own and the sink in another;
    the format runs in the process of the last stage (the feed's without other stages), so
    that only the lines cross to the sink's process, far cheaper than the changes would. (For
    another sink the sink's process formats: a process of its own would cost a pickling of
    every change each way for one cheap call, measured with ``benchmarks/bench_postgres.py
    --variants sink_processes``.)

    ``workers`` > 1 (implies ``processes``) runs each of those stage processes (``--filter``,
    ``--stage``, with the format when it joins them) in as many copies, each on the next chunk
    (`own_process`); the sink's process puts their chunks back in the feed's order before it
    writes. The stages must then not rely on state shared across changes.

    When those lines are all the pipeline makes (``--where`` at most, no other stage, no dead
    letters), the feed is asked to write them itself (`ChangeFeed.prefer_lines`, the PostgreSQL
    backend's compiled direct path, ``--where`` judged there too): batches of ready lines then
    pass the stages by, and cross to a sink's process as one buffer each. What the feed hands out
    as changes still goes through the stages.
    """
    from changefeed.pipelines.pipeline import Pipeline
    from changefeed.pipelines.stages import EncodeLines, OwnProcess

    parts = pipeline_parts(feed, **options)
    steps: list[Any] = list(parts.stages)
    out: Any = parts.sink
    encode = parts.encode
    lines = encode is not None and getattr(parts.sink, "takes_lines", False)
    if lines:
        connection = getattr(feed, "connection", None)
        encode = EncodeLines(options.get("fmt", "delta"), FormatOptions(
            model=options.get("model"), url=connection if isinstance(connection, str) else ""))
        if not (options.get("filter") or options.get("stages") or parts.dead_letter):
            _prefer_lines(feed, options)
    with blame("workers"):
        workers = workers_count(workers)
    processes = processes or workers > 1
    if processes:
        # ``--where`` (first, when given) stays in the feed's process: evaluated in C on a batch
        # at a time, it costs far less than the crossing of the changes it drops.
        stay = 1 if options.get("where") else 0
        steps = steps[:stay] + [OwnProcess(stage, workers) for stage in steps[stay:]]
        out = OwnProcess(out)
    if encode is not None:
        if processes and not lines:  # the sink's process formats the changes first
            steps.append(OwnProcess(encode))
            out = parts.sink
        else:
            steps.append(encode)
    return Pipeline(feed, steps, sink=out, dead_letter=parts.dead_letter,
                    ack_interval=ACK_SECONDS)


def _prefer_lines(feed: Any, options: PipelineOptions) -> bool:
    """Ask ``feed`` for its own lines of the pipeline's format, kept by its ``--where``; True if
    it will hand them out."""
    from changefeed.pipelines.where_expressions import parse_where

    prefer = getattr(feed, "prefer_lines", None)
    if prefer is None:  # not a `ChangeFeed` (a feed of a test or an embedding program)
        return False
    where = options.get("where")
    return bool(prefer(options.get("fmt", "delta"), options.get("model"),
                       where=parse_where(where) if where else None))
