"""``changefeed run``: stream the changes of tables as JSON lines, or through a pipeline.

Deltas go to stdout, one JSON object per line; everything meant for a person goes to stderr
(one line when streaming starts, snapshot progress, and every few seconds the rate and lag).
Without stages this is `changefeed.delivery.deliver` with a `LineOutput`; with ``--where``,
``--filter``, ``--sink`` ... the same loop with a pipeline's output. Output is acknowledged
only once flushed or confirmed by the sink; Ctrl-C or SIGTERM stops at the next change,
delivers, acknowledges, and exits 0.
"""

from __future__ import annotations

import errno
import gc
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from changefeed.change import ALL, Change, Operation
from changefeed.checkpoint import FileCheckpoint
from changefeed.cli.common import (
    ACK_SECONDS,
    CliError,
    Count,
    Seconds,
    expected_errors,
    log_format_option,
    parse_ops,
    setup_logging,
    stop_on_signals,
    url_option,
)
from changefeed.cli.pipeline_options import (
    OptionError,
    blame,
    build_cli_pipeline,
    cli_flag,
    workers_count,
)
from changefeed.delivery import (
    LineOutput,
    Output,
    Progress,
    buffered_stdout,
    deliver,
    silence_stdout,
)
from changefeed.errors import ChangefeedError
from changefeed.feed import ChangeFeed
from changefeed.formats.codec import dumps_line
from changefeed.formats.registry import FORMAT_NAMES, FORMATS, FormatOptions, format_named
from changefeed.linefiles import cut_partial_line, describe_os_error
from changefeed.preflight import check_writable
from changefeed.registry import get_changefeed, is_postgresql_url

log = logging.getLogger("changefeed")


@dataclass(frozen=True)
class RunOptions:
    """Everything ``changefeed run`` takes, one field per option (``tables`` is TABLE...).

    ``changefeed serve`` reads each pipeline of its config file into one of these, so both
    commands check and build a run the same way (`check_options`, `make_feed`, `make_output`).
    """

    tables: tuple[str, ...]
    url: str
    ops: Operation = ALL
    prefeed: str | None = None
    fmt: str = "delta"
    model: str | dict[str, str] | None = None
    exclude: tuple[str, ...] = ()
    chunk_size: int | None = None
    slot: str | None = None
    publication: str | None = None
    checkpoint: str | None = None
    limit: int | None = None
    idle_timeout: float | None = None
    where: str | None = None
    filter: str | None = None
    stages: tuple[str, ...] = ()
    sink: str = "-"
    dead_letter: str | None = None
    processes: bool = False
    workers: int = 1
    messages: tuple[str, ...] = ()
    quiet: bool = False

    @property
    def pipeline_wanted(self) -> bool:
        """Whether a pipeline runs (else the fast path: JSON lines to stdout)."""
        return bool(self.where or self.filter or self.stages or self.sink != "-"
                    or self.dead_letter or self.processes or self.workers > 1)


def check_options(
    options: RunOptions, flag: Callable[[str], str] = cli_flag, pipeline: bool = False
) -> dict[str, Any]:
    """Check the combination of ``options`` without I/O; return the feed's backend options.

    Raises `OptionError` naming the field to blame (``flag`` says how messages name it);
    ``pipeline`` says the caller always runs a pipeline (``changefeed serve``)."""
    url = options.url
    feed_options: dict[str, Any] = {}
    if options.slot is not None or options.publication is not None or options.messages:
        from changefeed.backends.postgres.names import (
            check_message_prefix,
            check_publication_name,
            check_slot_name,
        )
    if options.slot is not None:
        with blame("slot"):
            feed_options["slot"] = check_slot_name(options.slot)
    if options.publication is not None:
        with blame("publication"):
            feed_options["publication"] = check_publication_name(options.publication)
    if options.exclude:
        feed_options["exclude"] = list(options.exclude)
    if options.chunk_size is not None:
        feed_options["chunk_size"] = options.chunk_size
    postgresql = is_postgresql_url(url)
    if (feed_options or len(options.tables) > 1) and not postgresql:
        blamed = "tables" if len(options.tables) > 1 else next(
            name for name in ("exclude", "chunk_size", "slot", "publication")
            if getattr(options, name) not in (None, ()))
        raise OptionError(
            f"several tables, {flag('exclude')}, {flag('chunk_size')}, {flag('slot')} and"
            f" {flag('publication')} apply to PostgreSQL URLs only", blamed)
    if options.messages:
        if not postgresql:
            raise OptionError(f"{flag('messages')} applies to PostgreSQL URLs only", "messages")
        if pipeline or options.pipeline_wanted:
            others = ", ".join(flag(name) for name in (
                "where", "filter", "stages", "sink", "dead_letter", "processes", "workers"))
            raise OptionError(
                f"{flag('messages')} writes JSON lines to stdout: it does not combine with a"
                f" pipeline ({others}) yet", "messages")
        with blame("messages"):
            feed_options["messages"] = tuple(check_message_prefix(p) for p in options.messages)
    if (format_named(options.fmt).snapshot_markers and not (pipeline or options.pipeline_wanted)
            and postgresql):
        feed_options["snapshot_markers"] = True  # {"type": "snapshot", ...} lines
    return feed_options


def make_feed(options: RunOptions, feed_options: dict[str, Any]) -> ChangeFeed:
    """The feed ``options`` ask for, not connected yet; a checkpoint file is checked writable
    before the first change is delivered. ``feed_options``: from `check_options`, and more
    (``name``)."""
    feed_options = dict(feed_options)
    if options.checkpoint:
        with blame("checkpoint"):
            check_writable(options.checkpoint, "checkpoint")
        feed_options["checkpoint"] = FileCheckpoint(options.checkpoint)
    with blame("url"):
        return get_changefeed(options.url, ",".join(options.tables), options.ops,
                              prefeed=options.prefeed, **feed_options)


def make_output(feed: ChangeFeed, options: RunOptions) -> Output:
    """Where ``changefeed run`` delivers: the pipeline of its options, or JSON lines to stdout."""
    keep = _filtered_by_the_feed(feed, options)
    if keep is not None:
        return LineOutput(buffered_stdout(), encoder(options.fmt, options.model, options.url),
                          keep=keep)
    if options.pipeline_wanted:
        return build_cli_pipeline(
            feed, where=options.where, filter=options.filter, stages=options.stages,
            sink=options.sink, dead_letter=options.dead_letter, fmt=options.fmt,
            model=options.model, processes=options.processes, workers=options.workers,
        ).output()
    encode = encoder(options.fmt, options.model, options.url)
    if options.messages:
        encode = _with_messages(encode)
    # Nothing but these lines is wanted of a change: a feed that can write them itself may
    # hand them out so (the PostgreSQL backend's compiled direct path).
    feed.prefer_lines(options.fmt, options.model)
    out = buffered_stdout()
    _cut_partial_stdout_line()
    return LineOutput(out, encode)


def _cut_partial_stdout_line() -> None:
    """Stdout appending to a file that a killed run left with a partial last line: cut it
    (`changefeed.linefiles`), so that the first line of this run is not glued onto it."""
    try:
        cut_partial_line(sys.stdout.fileno(), "stdout")
    except (AttributeError, OSError, ValueError):  # no descriptor, or nothing to repair
        pass


_WRITE_FAILURES = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS", "ENXIO",
                                      "EBADF", "EPERM", "EACCES", "EINVAL")
    if hasattr(errno, name))
"""What a failed write to stdout raises (a full disk, a quota, a file-size limit, ...)."""


def _parse_workers(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """The ``--workers`` callback: a count, or ``auto`` (`workers_count`)."""
    try:
        return workers_count(value)
    except ChangefeedError as exc:
        raise click.BadParameter(exc.message) from exc


@click.command()
@click.argument("tables", nargs=-1, required=True, metavar="TABLE...")
@url_option
@click.option("--ops", default="all", show_default=True, callback=parse_ops,
              help="Operations to stream: insert, update, delete, truncate (comma-separated) or"
                   " all.")
@click.option("--prefeed", type=click.Choice(["snapshot"]), default=None,
              help="Start with every existing row (as snapshot inserts), then stream.")
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="delta",
              show_default=True,
              help="; ".join(f"{known.name}: {known.summary}" for known in FORMATS) + ".")
@click.option("--model", "models", multiple=True, metavar="[TABLE=]NAME",
              help="Model name in deltas, for all tables or per table (repeatable; default:"
                   " the table name).")
@click.option("--exclude", multiple=True, metavar="TABLE",
              help="PostgreSQL: leave out this table or pattern (repeatable).")
@click.option("--chunk-size", type=Count(), default=None, metavar="ROWS",
              help="PostgreSQL: rows per snapshot chunk at most (default 100000; fewer when"
                   " they would hold more than 16 MB).")
@click.option("--slot", default=None,
              help="PostgreSQL replication slot (default: changefeed_<table>).")
@click.option("--publication", default=None,
              help="PostgreSQL publication to use (default: the slot's name; created if missing).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="File keeping the last delivered position (needed to resume MongoDB).")
@click.option("--limit", type=Count(), default=None,
              help="Stop after this many changes.")
@click.option("--idle-timeout", type=Seconds(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop once no change arrived for this long.")
@click.option("--until-idle", type=Seconds(min=0, min_open=True), default=None,
              hidden=True)  # the old name of --idle-timeout, still accepted
@click.option("--where", "where_expr", default=None, metavar="EXPR",
              help='Keep changes whose row matches, e.g. \'status == "open" and priority >= 2\'.')
@click.option("--filter", "filter_json", default=None, metavar="JSON",
              help="A Snorky filter such as '[\"==\", \"color\", \"blue\"]': updates entering"
                   " or leaving it become inserts or deletes (needs old values).")
@click.option("--stage", "stages", multiple=True, metavar="MODULE:NAME",
              help="A Python callable taking each change (repeatable; after --where and"
                   " --filter): returns it, another item, None to drop it, or several.")
@click.option("--sink", default="-", show_default=True, metavar="SPEC",
              help="Where to deliver: -, a file, http(s)://URL, snorky+http://HOST/backend"
                   "?service=S&key=K, redis://HOST:PORT/0?stream=NAME,"
                   " kafka://HOST:PORT?topic={table}.")
@click.option("--dead-letter", default=None, metavar="PATH",
              help="Write changes that a stage or the sink failed on here and go on"
                   " (default: stop at the first failure).")
@click.option("--processes", is_flag=True,
              help="Run the stages and the sink in processes of their own.")
@click.option("--workers", default="1", show_default=True, callback=_parse_workers,
              metavar="N|auto",
              help="Run each --stage/--filter process in N copies (auto: one per core), for"
                   " CPU-heavy stages; implies --processes. The stages then must not rely on"
                   " state shared across changes: each copy sees some of them. The sink still"
                   " gets every change in order.")
@click.option("--messages", multiple=True, metavar="PREFIX",
              help="Also stream pg_logical_emit_message messages whose prefix starts with"
                   " PREFIX (repeatable; PostgreSQL 14+).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr, only errors.")
@log_format_option
def run(
    tables: tuple[str, ...],
    url: str,
    ops: Operation,
    prefeed: str | None,
    fmt: str,
    models: tuple[str, ...],
    exclude: tuple[str, ...],
    chunk_size: int | None,
    slot: str | None,
    publication: str | None,
    checkpoint: str | None,
    limit: int | None,
    idle_timeout: float | None,
    until_idle: float | None,
    where_expr: str | None,
    filter_json: str | None,
    stages: tuple[str, ...],
    sink: str,
    dead_letter: str | None,
    processes: bool,
    workers: int,
    messages: tuple[str, ...],
    quiet: bool,
    log_format: str,
) -> None:
    """Stream the changes of TABLE... as JSON lines to stdout (or to --sink).

    PostgreSQL streams any number of tables (or patterns such as 'public.*') through one
    slot; each change names its table.

    Runs until Ctrl-C or SIGTERM (or --limit / --idle-timeout); what was delivered is
    acknowledged before exit, so the next run continues after it.
    """
    setup_logging(quiet, log_format)
    if until_idle is not None:
        if idle_timeout is not None:
            raise click.UsageError("--until-idle is the old name of --idle-timeout: give one")
        idle_timeout = until_idle
    options = RunOptions(
        tables=tables, url=url, ops=ops, prefeed=prefeed, fmt=fmt, model=_parse_models(models),
        exclude=exclude, chunk_size=chunk_size, slot=slot, publication=publication,
        checkpoint=checkpoint, limit=limit, idle_timeout=idle_timeout, where=where_expr,
        filter=filter_json, stages=stages, sink=sink, dead_letter=dead_letter,
        processes=processes, workers=workers, messages=messages, quiet=quiet,
    )
    with expected_errors():
        feed = make_feed(options, check_options(options))  # not connected yet
        if not options.checkpoint and feed.resume == "checkpoint":
            log.warning(
                "no --checkpoint: this run cannot be resumed after it stops; give --checkpoint"
                " FILE to continue from the last delivered change next time"
            )
        output = make_output(feed, options)
        deliver_with_signals(feed, output, limit=limit, idle_timeout=idle_timeout, quiet=quiet)


def deliver_with_signals(
    feed: ChangeFeed,
    output: Output,
    *,
    limit: int | None = None,
    idle_timeout: float | None = None,
    quiet: bool = False,
) -> int:
    """`deliver` as a command runs it: SIGINT/SIGTERM stop it cleanly, progress goes to stderr,
    and a reader of stdout that went away ends it quietly (exit 0). Returns the count."""
    restore_signals = stop_on_signals(feed)
    # What start-up made (modules, the feed, the output) lives as long as the process: frozen,
    # the collector's full collections no longer walk it, a pause of 5-50 ms in the stream
    # (several thousand changes held up) every few seconds under load otherwise.
    gc.freeze()
    try:
        result = deliver(
            feed, output, limit=limit, idle_timeout=idle_timeout, ack_interval=ACK_SECONDS,
            progress=Progress(feed, quiet),
        )
    except OSError as exc:
        if not (isinstance(output, LineOutput) and exc.errno in _WRITE_FAILURES):
            raise
        # Stdout could not take a line: what was flushed before is acknowledged, a line
        # written in part is cut off, and the rest (in stdout's buffer) goes nowhere.
        _cut_partial_stdout_line()
        silence_stdout()
        raise CliError(f"cannot write to stdout: {describe_os_error(exc)}; what was not written"
                       " is not acknowledged and comes again on the next run", 5) from None
    finally:
        restore_signals()
    if result.reader_gone:
        silence_stdout()
    return result.count


def _parse_models(values: tuple[str, ...]) -> str | dict[str, str] | None:
    """``--model Task`` (every table) or ``--model tasks=Task`` (per table, repeatable)."""
    if not values:
        return None
    per_table = {}
    default = None
    for value in values:
        table, sep, name = value.partition("=")
        if not sep:
            default = value
        elif not table.strip() or not name.strip():
            raise click.BadParameter(f"{value!r}: use NAME or TABLE=NAME", param_hint="--model")
        else:
            per_table[table.strip()] = name.strip()
    if not per_table:
        return default
    if default is not None:
        per_table["*"] = default
    return per_table


def _filtered_by_the_feed(feed: ChangeFeed, options: RunOptions) -> Callable[[Any], bool] | None:
    """With ``--where`` and nothing else of a pipeline (stdout, no other stage, no dead
    letters), a feed that can filter and write the lines itself does (the PostgreSQL backend's
    compiled path: no Python call per change); then the function deciding the changes it could
    not judge, else None (a pipeline runs). ``--processes`` changes nothing then: no stage is
    left to run elsewhere."""
    if not options.where or options.filter or options.stages or options.sink != "-" \
            or options.dead_letter or options.messages:
        return None
    from changefeed.pipelines.where_expressions import parse_where, row_keeper

    with blame("where"):
        expression = parse_where(options.where)
    if not feed.prefer_lines(options.fmt, options.model, where=expression):
        return None
    return row_keeper(expression)


def encoder(
    fmt: str, model: str | dict[str, str] | None, url: str = ""
) -> Callable[[Change], bytes]:
    """The JSON-line encoder of format ``fmt`` (`changefeed.formats.registry`)."""
    return format_named(fmt).lines(FormatOptions(model=model, url=url))


def _with_messages(encode: Callable[[Change], bytes]) -> Callable[[Any], bytes]:
    """``encode`` for changes, and a message's own JSON line (`Message.to_dict`) for messages."""
    from changefeed.message import Message

    def encode_either(item: Any) -> bytes:
        if item.__class__ is Message:
            return dumps_line(item.to_dict())
        return encode(item)

    return encode_either
