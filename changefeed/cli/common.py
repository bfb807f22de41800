"""What the commands share: one-line errors, logging to stderr, signals, common options."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

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
        click.echo(f"changefeed: error: {redact(self.format_message())}", err=True)


@contextmanager
def expected_errors() -> Iterator[None]:
    """Turn changefeed's own errors into `CliError`: one line, the error's exit code."""
    try:
        yield
    except ChangefeedError as exc:
        raise CliError(exc.message, exc.exit_code) from exc


def parse_ops(ctx: click.Context, param: click.Parameter, value: str) -> Operation:
    """The ``--ops`` callback: ``insert,update`` -> `Operation` flags."""
    try:
        return Operation.parse(value)
    except ChangefeedError as exc:
        raise click.BadParameter(exc.message) from exc


def setup_logging(quiet: bool) -> None:
    """Messages for people go to stderr, prefixed and with URL secrets redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("changefeed: %(message)s"))
    root = logging.getLogger("changefeed")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


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
