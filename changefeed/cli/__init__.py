"""The ``changefeed`` command line: stream a table's changes as JSON lines.

Commands: ``run`` (`changefeed.cli.run`), ``serve`` (`changefeed.cli.serve`) and ``status``
(`changefeed.cli.status`), the PostgreSQL maintenance commands ``slots``, ``drain`` and
``backfill`` (`changefeed.cli.postgres`), and ``demo``. Expected failures (bad input,
unreachable server, missing privilege) print one line and exit with the error's exit code
(`changefeed.errors`); a traceback means a bug.
"""

from __future__ import annotations

import click

from changefeed.cli.common import ACK_SECONDS, expected_errors, setup_logging
from changefeed.cli.postgres import backfill, drain, slots
from changefeed.cli.run import encoder, run
from changefeed.cli.serve import serve
from changefeed.cli.status import status
from changefeed.formats.registry import FORMAT_NAMES
from changefeed.redact import install_excepthook


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="changefeed")
def cli() -> None:
    """Stream database changes as JSON lines of deltas."""


@click.command()
@click.option("--seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="How long to run (0: until Ctrl-C).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="delta",
              show_default=True)
def demo(seconds: float, fmt: str) -> None:
    """Stream live deltas from a throwaway local PostgreSQL with a demo writer."""
    from changefeed.cli.demo import run_demo  # imports the PostgreSQL driver: only here

    setup_logging(False)
    with expected_errors():
        run_demo(seconds=seconds or None, encode=encoder(fmt, None))


for command in (run, serve, status, slots, drain, backfill, demo):
    cli.add_command(command)


def main() -> None:
    """Console entry point."""
    install_excepthook()
    cli(prog_name="changefeed")


__all__ = ["ACK_SECONDS", "cli", "main"]
