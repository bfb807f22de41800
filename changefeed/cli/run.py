"""``changefeed run``: stream the changes of tables as JSON lines, or through a pipeline.

Deltas go to stdout, one JSON object per line; everything meant for a person goes to stderr
(one line when streaming starts, snapshot progress, and every few seconds the rate and lag).
Without stages this is `changefeed.delivery.deliver` with a `LineOutput`; with ``--where``,
``--filter``, ``--sink`` ... the same loop with a pipeline's output. Output is acknowledged
only once flushed or confirmed by the sink; Ctrl-C or SIGTERM stops at the next change,
delivers, acknowledges, and exits 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click

from changefeed.change import Change, Operation
from changefeed.checkpoint import FileCheckpoint
from changefeed.cli.common import (
    ACK_SECONDS,
    CliError,
    expected_errors,
    parse_ops,
    setup_logging,
    stop_on_signals,
    url_option,
)
from changefeed.delivery import (
    LineOutput,
    Output,
    Progress,
    buffered_stdout,
    deliver,
    silence_stdout,
)
from changefeed.feed import ChangeFeed
from changefeed.formats.codec import dumps_line
from changefeed.formats.registry import FORMAT_NAMES, FORMATS, FormatOptions, format_named
from changefeed.preflight import check_writable
from changefeed.registry import get_changefeed, is_postgresql_url

log = logging.getLogger("changefeed")


@click.command()
@click.argument("tables", nargs=-1, required=True, metavar="TABLE...")
@url_option
@click.option("--ops", default="insert,update,delete", show_default=True, callback=parse_ops,
              help="Operations to stream: insert, update, delete (comma-separated) or all.")
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
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, metavar="ROWS",
              help="PostgreSQL: rows per snapshot chunk (default 5000).")
@click.option("--slot", default=None,
              help="PostgreSQL replication slot (default: changefeed_<table>).")
@click.option("--publication", default=None,
              help="PostgreSQL publication to use (default: the slot's name; created if missing).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="File keeping the last delivered position (needed to resume MongoDB).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Stop after this many changes.")
@click.option("--until-idle", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop once no change arrived for this long.")
@click.option("--where", "where_expr", default=None, metavar="EXPR",
              help='Keep changes whose row matches, e.g. \'status == "open" and priority >= 2\'.')
@click.option("--filter", "filter_json", default=None, metavar="JSON",
              help="A Snorky filter such as '[\"==\", \"color\", \"blue\"]': updates entering"
                   " or leaving it become inserts or deletes (needs old values).")
@click.option("--sink", default="-", show_default=True, metavar="SPEC",
              help="Where to deliver: -, a file, http(s)://URL, snorky+http://HOST/backend"
                   "?service=S&key=K, redis://HOST:PORT/0?stream=NAME,"
                   " kafka://HOST:PORT?topic={table}.")
@click.option("--dead-letter", default=None, metavar="PATH",
              help="Write changes that a stage or the sink failed on here and go on"
                   " (default: stop at the first failure).")
@click.option("--processes", is_flag=True,
              help="Run the stages and the sink in processes of their own.")
@click.option("--messages", multiple=True, metavar="PREFIX",
              help="Also stream pg_logical_emit_message messages whose prefix starts with"
                   " PREFIX (repeatable; PostgreSQL 14+).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr, only errors.")
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
    until_idle: float | None,
    where_expr: str | None,
    filter_json: str | None,
    sink: str,
    dead_letter: str | None,
    processes: bool,
    messages: tuple[str, ...],
    quiet: bool,
) -> None:
    """Stream the changes of TABLE... as JSON lines to stdout (or to --sink).

    PostgreSQL streams any number of tables (or patterns such as 'public.*') through one
    slot; each change names its table.

    Runs until Ctrl-C or SIGTERM (or --limit / --until-idle); what was delivered is
    acknowledged before exit, so the next run continues after it.
    """
    setup_logging(quiet)
    options: dict[str, Any] = {}
    if slot is not None:
        options["slot"] = slot
    if publication is not None:
        options["publication"] = publication
    if exclude:
        options["exclude"] = list(exclude)
    if chunk_size is not None:
        options["chunk_size"] = chunk_size
    if (options or len(tables) > 1) and not is_postgresql_url(url):
        raise CliError("several tables, --exclude, --slot and --publication apply to PostgreSQL"
                       " URLs only", 2)
    model = _parse_models(models)
    pipeline_wanted = bool(where_expr or filter_json or sink != "-" or dead_letter or processes)
    if messages:
        if not is_postgresql_url(url):
            raise CliError("--messages applies to PostgreSQL URLs only", 2)
        if pipeline_wanted:
            raise CliError("--messages writes JSON lines to stdout: it does not combine with"
                           " --where, --filter, --sink, --dead-letter or --processes yet", 2)
        options["messages"] = messages
    if format_named(fmt).snapshot_markers and not pipeline_wanted and is_postgresql_url(url):
        options["snapshot_markers"] = True  # {"type": "snapshot", ...} lines
    table = ",".join(tables)
    with expected_errors():
        if checkpoint:
            check_writable(checkpoint, "checkpoint")  # before the first change is delivered
            options["checkpoint"] = FileCheckpoint(checkpoint)
        feed = get_changefeed(url, table, ops, prefeed=prefeed, **options)  # not connected yet
        if not checkpoint and feed.resume == "checkpoint":
            log.warning(
                "no --checkpoint: this run cannot be resumed after it stops; give --checkpoint"
                " FILE to continue from the last delivered change next time"
            )
        output: Output
        if pipeline_wanted:
            from changefeed.cli.pipeline_options import build_cli_pipeline

            output = build_cli_pipeline(
                feed, where=where_expr, filter=filter_json, sink=sink, dead_letter=dead_letter,
                fmt=fmt, model=model, processes=processes,
            ).output()
        else:  # the fast path: no stages, JSON lines to stdout
            encode = encoder(fmt, model, url)
            if messages:
                encode = _with_messages(encode)
            output = LineOutput(buffered_stdout(), encode)
        deliver_with_signals(feed, output, limit=limit, idle_timeout=until_idle, quiet=quiet)


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
    try:
        result = deliver(
            feed, output, limit=limit, idle_timeout=idle_timeout, ack_interval=ACK_SECONDS,
            progress=Progress(feed, quiet),
        )
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
