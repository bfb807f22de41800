"""What the commands share: one-line errors, logging to stderr, signals, common options."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import click

from changefeed.bounds import MAX_COUNT, MAX_SECONDS
from changefeed.change import Operation
from changefeed.errors import ChangefeedError
from changefeed.feed import ChangeFeed
from changefeed.redact import RedactingFormatter, redact
from changefeed.registry import is_postgresql_url, url_scheme

log = logging.getLogger("changefeed")

ACK_SECONDS = 0.2
"""Acknowledge (and fsync the checkpoint file) at most this often (see
`changefeed.delivery.ThrottledAcks`), in ``changefeed run`` with or without a pipeline."""


class CliError(click.ClickException):
    """An expected failure: shown as one line on stderr, exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it from the instance

    def show(self, file: Any = None) -> None:
        # Messages may quote URLs (a sink's, or a driver's error text): never their secrets.
        if _json_logs:  # a log collector reads stderr: the last line is JSON too
            log.error("%s", self.format_message(), extra={"fields": {"exit_code": self.exit_code}})
            return
        click.echo(f"changefeed: error: {redact(self.format_message())}", err=True)


@contextmanager
def expected_errors() -> Iterator[None]:
    """Turn changefeed's own errors into `CliError`: one line, the error's exit code."""
    try:
        yield
    except ChangefeedError as exc:
        raise CliError(exc.message, exc.exit_code) from exc


class Seconds(click.FloatRange):
    """A duration in seconds: a finite number (not ``nan``, ``inf``) from ``min`` up to
    `MAX_SECONDS`; ``-0`` is 0."""

    name = "number of seconds"

    def __init__(self, min: float = 0.0, min_open: bool = False,
                 max: float = MAX_SECONDS) -> None:
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super(click.FloatRange, self).convert(value, param, ctx)  # float() of it
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number of seconds: give a finite number"
                      f" ({self._describe_range()})", param, ctx)
        return super().convert(number + 0.0, param, ctx)  # + 0.0: -0.0 becomes 0.0


class Count(click.IntRange):
    """A whole number from ``min`` to `MAX_COUNT`."""

    def __init__(self, min: int = 1, max: int = MAX_COUNT) -> None:
        super().__init__(min=min, max=max)


def parse_ops(ctx: click.Context, param: click.Parameter, value: str) -> Operation:
    """The ``--ops`` callback: ``insert,update`` -> `Operation` flags."""
    try:
        return Operation.parse(value)
    except ChangefeedError as exc:
        raise click.BadParameter(exc.message) from exc


LOG_FORMATS = ("text", "json")
"""``--log-format`` values: ``text`` for people, ``json`` for log collectors."""


class TextLogFormatter(RedactingFormatter):
    """``changefeed: message``, or ``changefeed: [pipeline] message`` for a pipeline's records."""

    def __init__(self) -> None:
        super().__init__("changefeed: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802  (logging's name)
        pipeline = getattr(record, "pipeline", None)
        text = super().formatMessage(record)
        return text.replace("changefeed: ", f"changefeed: [{pipeline}] ", 1) if pipeline else text


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``pipeline`` (null outside
    one), ``event`` (the message the text format shows) and ``fields`` (the logger, what the
    record carries in ``extra={"fields": {...}}``, and an exception's traceback as ``error``).
    Every string in it is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"logger": record.name, **(getattr(record, "fields", None) or {})}
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "pipeline": getattr(record, "pipeline", None),
            "event": record.getMessage(),
            "fields": fields,
        }
        return json.dumps(_redacted(line), ensure_ascii=False, default=str)


def _redacted(value: Any) -> Any:
    """``value`` with `redact` applied to every string in it (before JSON escapes them)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float)) else redact(str(value))


class _PipelineLabel(logging.Filter):
    """Labels every record that has no pipeline yet with this process's pipeline."""

    def __init__(self, pipeline: str) -> None:
        super().__init__()
        self.pipeline = pipeline

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "pipeline", None) is None:
            record.pipeline = self.pipeline
        return True


def setup_logging(quiet: bool, log_format: str = "text", pipeline: str | None = None) -> None:
    """Messages go to stderr with secrets redacted: prefixed lines for people (``text``), or one
    JSON object per line (``json``, see `JsonLogFormatter`). ``pipeline`` labels every record
    (a pipeline's own process under ``changefeed serve``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    if pipeline is not None:
        handler.addFilter(_PipelineLabel(pipeline))
    root = logging.getLogger("changefeed")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    global _json_logs
    _json_logs = log_format == "json"


_json_logs = False
"""Whether `setup_logging` chose JSON lines (`CliError` then shows itself as one)."""

log_format_option = click.option(
    "--log-format", type=click.Choice(LOG_FORMATS), default="text", envvar="CHANGEFEED_LOG_FORMAT",
    help="stderr as lines for people, or one JSON object per line (default:"
         " $CHANGEFEED_LOG_FORMAT, else text).",
)


def require_postgresql(url: str, message: str) -> None:
    """Exit 2 with ``message`` unless ``url`` is a PostgreSQL URL (or conninfo string)."""
    if url_scheme(url) and not is_postgresql_url(url):  # a conninfo string has no scheme
        raise CliError(message, 2)


url_option = click.option(
    "--url", envvar="CHANGEFEED_URL", required=True, metavar="URL",
    help="Database URL: postgresql://, mongodb:// or rethinkdb:// (default: $CHANGEFEED_URL).",
)


def stop_on_signals(feed: ChangeFeed) -> Callable[[], None]:
    """Make SIGINT/SIGTERM stop the feed cleanly; a second signal interrupts at once.
    Returns the function that restores the previous handlers."""
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if feed.stopping:
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
