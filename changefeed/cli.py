"""The ``changefeed`` command line: stream a table's changes as JSON lines.

Deltas go to stdout, one JSON object per line; everything meant for a person goes to stderr
(one line when streaming starts, snapshot progress, and every few seconds the rate and lag).
Expected failures (bad input, unreachable server, missing privilege) print one line and exit
with the error's exit code; a traceback means a bug.

Delivery: output is buffered and flushed whenever the stream goes quiet or the buffer fills;
only after a flush are the written changes acknowledged (to the checkpoint file and the
server). Ctrl-C or SIGTERM stops at the next change, flushes, acknowledges, and exits 0.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import click

from changefeed.change import Change, Operation
from changefeed.checkpoint import FileCheckpoint
from changefeed.delivery import ThrottledAcks
from changefeed.errors import ChangefeedError
from changefeed.feed import ChangeFeed
from changefeed.pipelines.delta import delta_line_encoder, dumps_line
from changefeed.preflight import check_writable
from changefeed.redact import RedactingFormatter, install_excepthook, redact
from changefeed.registry import get_changefeed, is_postgresql_url, url_scheme

log = logging.getLogger("changefeed")

FLUSH_BYTES = 256 * 1024
"""While busy, flush stdout (and hand what was written to `ThrottledAcks`) per this many bytes."""
PROGRESS_SECONDS = 5.0
ACK_SECONDS = 0.2
"""Acknowledge (and fsync the checkpoint file) at most this often (see `ThrottledAcks`), in
``changefeed run`` with or without a pipeline."""


class CliError(click.ClickException):
    """An expected failure: shown as one line on stderr, exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it from the instance

    def show(self, file: Any = None) -> None:
        # Messages may quote URLs (a sink's, or a driver's error text): never their secrets.
        click.echo(f"changefeed: error: {redact(self.format_message())}", err=True)


@contextmanager
def _expected_errors() -> Iterator[None]:
    try:
        yield
    except ChangefeedError as exc:
        raise CliError(exc.message, exc.exit_code) from exc


def _parse_ops(ctx: click.Context, param: click.Parameter, value: str) -> Operation:
    try:
        return Operation.parse(value)
    except ChangefeedError as exc:
        raise click.BadParameter(exc.message) from exc


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("changefeed: %(message)s"))
    root = logging.getLogger("changefeed")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="changefeed")
def cli() -> None:
    """Stream database changes as JSON lines of deltas."""


url_option = click.option(
    "--url", envvar="CHANGEFEED_URL", required=True, metavar="URL",
    help="Database URL: postgresql://, mongodb:// or rethinkdb:// (default: $CHANGEFEED_URL).",
)


@cli.command()
@click.argument("tables", nargs=-1, required=True, metavar="TABLE...")
@url_option
@click.option("--ops", default="insert,update,delete", show_default=True, callback=_parse_ops,
              help="Operations to stream: insert, update, delete (comma-separated) or all.")
@click.option("--prefeed", type=click.Choice(["snapshot"]), default=None,
              help="Start with every existing row (as snapshot inserts), then stream.")
@click.option("--format", "fmt", type=click.Choice(["delta", "change", "debezium"]),
              default="delta", show_default=True,
              help="Snorky delta, the full change with its position, or Debezium's envelope.")
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
    _setup_logging(quiet)
    options: dict[str, Any] = {}
    if slot is not None:
        options["slot"] = slot
    if publication is not None:
        options["publication"] = publication
    if exclude:
        options["exclude"] = list(exclude)
    if chunk_size is not None:
        options["snapshot_batch"] = chunk_size
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
    if fmt == "change" and not pipeline_wanted and is_postgresql_url(url):
        options["snapshot_markers"] = True  # {"type": "snapshot", ...} lines
    table = ",".join(tables)
    with _expected_errors():
        if checkpoint:
            check_writable(checkpoint, "checkpoint")  # before the first change is delivered
            options["checkpoint"] = FileCheckpoint(checkpoint)
        feed = get_changefeed(url, table, ops, prefeed=prefeed, **options)  # not connected yet
        if not checkpoint and feed.resume == "checkpoint":
            log.warning(
                "no --checkpoint: this run cannot be resumed after it stops; give --checkpoint"
                " FILE to continue from the last delivered change next time"
            )
        if pipeline_wanted:
            from changefeed.pipelines.cli import build_cli_pipeline

            pipeline = build_cli_pipeline(
                feed, where=where_expr, filter=filter_json, sink=sink, dead_letter=dead_letter,
                fmt=fmt, model=model, processes=processes,
            )
            run_pipeline(pipeline, limit=limit, idle=until_idle, quiet=quiet)
        else:  # the fast path: no stages, JSON lines to stdout
            encode = _encoder(fmt, model, url)
            if messages:
                encode = _with_messages(encode)
            stream_to(feed, buffered_stdout(), encode, limit=limit, idle=until_idle, quiet=quiet)


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


def run_pipeline(
    pipeline: Any, *, limit: int | None = None, idle: float | None = None, quiet: bool = False
) -> int:
    """Run a `changefeed.pipelines.Pipeline` with the CLI's signals and progress lines."""
    feed = pipeline.feed
    progress = _Progress(feed, quiet)
    done = threading.Event()

    def report() -> None:
        while not done.wait(1.0):
            progress.maybe_report(feed.stats.changes)

    reporter = threading.Thread(target=report, name="changefeed-progress", daemon=True)
    reporter.start()
    stop_signals = _stop_on_signals(feed)
    try:
        handled = pipeline.run(stop_after=limit, idle_timeout=idle)
    except ChangefeedError as exc:
        if isinstance(exc.__cause__, BrokenPipeError):  # the reader of stdout went away
            _silence_stdout()
            return pipeline.handled
        raise
    finally:
        stop_signals()
        done.set()
        feed.close()
    progress.report(handled, final=True)
    return handled


def _encoder(
    fmt: str, model: str | dict[str, str] | None, url: str = ""
) -> Callable[[Change], bytes]:
    if fmt == "debezium":
        from changefeed.pipelines.debezium import Source, database_of, line_encoder

        return line_encoder(Source(database=database_of(url)))
    if fmt == "change":

        def encode_change(change: Change) -> bytes:
            return dumps_line(change.to_dict())

        return encode_change

    return delta_line_encoder(model)


def _with_messages(encode: Callable[[Change], bytes]) -> Callable[[Any], bytes]:
    """``encode`` for changes, and a message's own JSON line (`Message.to_dict`) for messages."""
    from changefeed.message import Message

    def encode_either(item: Any) -> bytes:
        if item.__class__ is Message:
            return dumps_line(item.to_dict())
        return encode(item)

    return encode_either


def stream_to(
    feed: ChangeFeed,
    out: BinaryIO,
    encode: Callable[[Change], bytes],
    *,
    limit: int | None = None,
    idle: float | None = None,
    quiet: bool = False,
) -> int:
    """Write ``feed``'s changes to ``out``, acknowledging only what was flushed; returns count."""
    # Each line goes straight into ``out``'s own buffer and is freed at once. Keeping a few
    # thousand encoded lines alive until a flush made every encoding four times slower
    # (glibc returning freed memory to the system and asking for it again).
    write = out.write
    size = 0
    written = 0
    pending_position: Any = None
    acks = ThrottledAcks(feed, ACK_SECONDS)
    progress = _Progress(feed, quiet)

    def flush(final: bool = False) -> None:
        nonlocal size, pending_position
        out.flush()
        size = 0
        acks.delivered(pending_position, final)
        pending_position = None

    stop_signals = _stop_on_signals(feed)
    # The limit and a stop request are handled here, not by changes(), so that the last
    # acknowledgement is made while the stream is still open and goes out with its closing.
    changes = feed.changes(idle_timeout=idle, ticks=True)
    try:
        for change in changes:
            if change is None:
                flush()
                progress.maybe_report(written)
                if feed._stopping:
                    break
                continue
            size += write(encode(change))
            written += 1
            pending_position = change.position
            if written == limit:
                break
            if size >= FLUSH_BYTES:
                flush()
                progress.maybe_report(written)
        flush(final=True)
    except BrokenPipeError:
        # The reader went away: what it did not read is not acknowledged.
        _silence_stdout()
        return written
    except ChangefeedError:
        flush(final=True)  # the feed failed, the output did not: keep what was delivered
        raise
    finally:
        changes.close()
        stop_signals()
        feed.close()
    progress.report(written, final=True)
    return written


def buffered_stdout() -> BinaryIO:
    """Binary stdout with a buffer, also under ``PYTHONUNBUFFERED`` / ``python -u`` (which make
    ``sys.stdout.buffer`` a raw file: one system call per line)."""
    stdout = sys.stdout.buffer
    if isinstance(stdout, io.BufferedIOBase):
        return stdout
    return io.BufferedWriter(io.FileIO(sys.stdout.fileno(), "wb", closefd=False))


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _stop_on_signals(feed: ChangeFeed) -> Callable[[], None]:
    """Make SIGINT/SIGTERM stop the feed cleanly; a second signal interrupts at once."""
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if feed._stopping:
            raise KeyboardInterrupt
        log.info("stopping: flushing and acknowledging what was written")
        feed.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread (e.g. under a test runner thread)
            pass

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


class _Progress:
    """Every few seconds while busy: changes so far, rate, and lag behind the source."""

    def __init__(self, feed: ChangeFeed, quiet: bool) -> None:
        self.feed = feed
        self.quiet = quiet
        self.started = self.last = time.monotonic()
        self.last_count = 0

    def maybe_report(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and count != self.last_count:
            self.report(count)

    def report(self, count: int, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        stats = self.feed.stats
        if final:
            elapsed = max(now - self.started, 1e-9)
            log.info("stopped after %s changes (%.0f/s on average)", f"{count:,}", count / elapsed)
            return
        rate = (count - self.last_count) / max(now - self.last, 1e-9)
        lag = []
        if stats.last_committed_at is not None:
            seconds = time.time() - stats.last_committed_at.timestamp()
            lag.append(f"{max(seconds, 0):.1f} s")
        if stats.lag_bytes is not None:
            lag.append(f"{stats.lag_bytes:,} bytes of WAL")
        log.info(
            "%s changes, %s/s, lag %s", f"{count:,}", f"{rate:,.0f}", " / ".join(lag) or "unknown"
        )
        self.last, self.last_count = now, count


@cli.command()
@url_option
@click.option("--drop", "drops", multiple=True, metavar="SLOT",
              help="Drop this slot and its publication (repeatable).")
@click.option("--drop-inactive", is_flag=True,
              help="Drop every inactive changefeed slot and its publication.")
@click.option("--warn-retained", default="1GB", show_default=True, metavar="SIZE",
              callback=lambda ctx, param, value: _parse_size(value),
              help="Warn about slots that make the server keep more WAL than this.")
def slots(url: str, drops: tuple[str, ...], drop_inactive: bool, warn_retained: int) -> None:
    """List (or drop) the PostgreSQL slots and publications changefeed created.

    An abandoned slot makes PostgreSQL keep WAL forever: drop the ones no feed uses.
    Slots made with --slot are listed too (marked "named").
    """
    if url_scheme(url) and not is_postgresql_url(url):  # a conninfo string has no scheme
        raise CliError("changefeed slots manages PostgreSQL replication slots: give a"
                       " postgresql:// URL", 2)
    from changefeed.backends.postgres import slots as pg_slots

    with _expected_errors():
        if drops or drop_inactive:
            for name in pg_slots.drop_slots(url, list(drops), inactive=drop_inactive):
                click.echo(f"dropped {name}")
            return
        rows = pg_slots.list_slots(url)
        if not rows:
            click.echo("no changefeed slots", err=True)
            return
        click.echo(f"{'slot':30} {'active':6} {'confirmed':>14} {'behind':>10} {'retains':>10}"
                   f" {'wal':9} tables")
        for row in rows:
            click.echo(
                f"{row.name:30} {'yes' if row.active else 'no':6} {row.confirmed_lsn or '-':>14}"
                f" {_bytes(row.behind_bytes):>10} {_bytes(row.retained_bytes):>10}"
                f" {row.wal_status or '-':9} {', '.join(row.tables) or '-'}"
                + (" (named)" if row.named else "")
            )
        for row in rows:
            if (row.retained_bytes or 0) > warn_retained:
                click.echo(
                    f"changefeed: warning: slot {row.name} makes the server keep"
                    f" {_bytes(row.retained_bytes)} of WAL; if no feed uses it any more, drop it:"
                    f" changefeed slots --drop {row.name}", err=True,
                )


@cli.command()
@url_option
@click.option("--slot", required=True, metavar="NAME", help="The replication slot to check.")
@click.option("--timeout", type=click.FloatRange(min=0), default=300.0, show_default=True,
              metavar="SECONDS", help="Give up after this long.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr, only the result.")
def drain(url: str, slot: str, timeout: float, quiet: bool) -> None:
    """Wait until the slot's consumer has delivered everything committed before this call.

    Exits 0 once the slot's confirmed position passes the WAL position read at the start;
    on timeout exits 1 saying how far behind the slot is. A deploy runs it before a migration
    that old notifications or old rows could not survive.
    """
    if url_scheme(url) and not is_postgresql_url(url):
        raise CliError("changefeed drain checks PostgreSQL replication slots: give a"
                       " postgresql:// URL", 2)
    from changefeed.backends.postgres.drain import describe
    from changefeed.backends.postgres.drain import drain as drain_slot

    def report(state: Any) -> None:
        if not quiet:
            click.echo(f"changefeed: waiting: {describe(state)}", err=True)

    with _expected_errors():
        state = drain_slot(url, slot, timeout=timeout, report=report)
    click.echo(describe(state))


def _parse_size(text: str) -> int:
    """``512MB``, ``1GB``, ``1048576``: a byte count (usage error on anything else)."""
    units = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    number, unit = text.strip().upper().rstrip("B") or "0", ""
    for suffix in ("K", "M", "G", "T"):
        if number.endswith(suffix):
            number, unit = number[:-1], suffix + "B"
    try:
        value = float(number.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 512MB or 1GB") from None
    return int(value * units[unit])


@cli.command()
@click.argument("tables", nargs=-1, required=True, metavar="TABLE...")
@url_option
@click.option("--slot", required=True, help="The slot of the feed that is to back-fill.")
def backfill(tables: tuple[str, ...], url: str, slot: str) -> None:
    """Ask the feed of --slot to back-fill TABLE... while it streams.

    The request goes through the slot: a running feed starts reading the tables in
    primary-key chunks at once, a stopped one when it next runs.
    """
    if url_scheme(url) and not is_postgresql_url(url):
        raise CliError("changefeed backfill works on PostgreSQL slots: give a postgresql:// URL", 2)
    from changefeed.backends.postgres import backfill as pg_backfill
    from changefeed.backends.postgres import catalog, names
    from changefeed.backends.postgres.slots import _connect

    with _expected_errors():
        parsed = [names.parse_table_name(t) for name in tables for t in names.split_tables(name)]
        with _connect(url) as conn:
            resolved = catalog.resolve_tables(conn, parsed)
            requested = pg_backfill.request_backfill(conn, names.check_slot_name(slot), resolved)
    click.echo(f"back-fill of {', '.join(requested)} requested on slot {slot}", err=True)


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("kB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


@cli.command()
@click.option("--seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="How long to run (0: until Ctrl-C).")
@click.option("--format", "fmt", type=click.Choice(["delta", "change"]), default="delta",
              show_default=True)
def demo(seconds: float, fmt: str) -> None:
    """Stream live deltas from a throwaway local PostgreSQL with a demo writer."""
    from changefeed.demo import run_demo

    _setup_logging(False)
    with _expected_errors():
        run_demo(seconds=seconds or None, encode=_encoder(fmt, None))


def main() -> None:
    """Console entry point."""
    install_excepthook()
    cli(prog_name="changefeed")
