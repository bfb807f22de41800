"""``changefeed serve``: pipelines from a config file, and sync for app clients, in one process.

``--config FILE`` runs the pipelines the file names (`changefeed.serve.pipelines`); ``TABLE...``
with ``--url`` serves those tables to app clients through Electric's shape API and Mobync's sync
protocol (`changefeed.serve.sync`). Both can run in one process behind one HTTP server, which
also answers ``/healthz``, ``/readyz`` and ``/metrics`` (`changefeed.serve.app`). Everything is
checked before the port is bound and anything connects: a bad option or config file is one line
and exit 2.
"""

from __future__ import annotations

import click

from changefeed.cli.common import CliError, expected_errors, log_format_option, setup_logging


@click.command()
@click.argument("tables", nargs=-1, metavar="[TABLE...]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              metavar="FILE", help="TOML file of pipelines to run (README: Operate).")
@click.option("--url", envvar="CHANGEFEED_URL", default=None, metavar="URL",
              help="PostgreSQL URL of the TABLEs served to app clients (default:"
                   " $CHANGEFEED_URL).")
@click.option("--app", "app_spec", default=None, metavar="MODULE:OBJECT",
              help="The application's authenticate() and validate_create/update/delete().")
@click.option("--owner-column", default=None, metavar="COLUMN",
              help="Keep every device to the rows whose COLUMN is its owner id.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--quiet", "-q", is_flag=True, help="stderr shows only warnings and errors.")
@log_format_option
def serve(
    tables: tuple[str, ...],
    config_path: str | None,
    url: str | None,
    app_spec: str | None,
    owner_column: str | None,
    host: str,
    port: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Run pipelines from --config FILE and/or serve TABLE... to app clients, over HTTP.

    SIGTERM or Ctrl-C stops cleanly (what was delivered is acknowledged); SIGHUP reloads
    the config file.
    """
    setup_logging(quiet, log_format)
    try:
        from changefeed.serve.server import run_server
    except ImportError as exc:
        raise CliError(f"changefeed serve needs its extra: pip install 'changefeed[serve]'"
                       f" ({exc})", 2) from exc
    with expected_errors():
        services = []
        if config_path is not None:
            from changefeed.serve.pipelines import PipelinesService

            services.append(PipelinesService.from_file(config_path, log_format=log_format,
                                                       quiet=quiet))
        if tables:
            from changefeed.serve.sync import SyncService

            services.append(SyncService.from_options(
                url=url, tables=tables, app=app_spec, owner_column=owner_column,
            ))
        elif app_spec or owner_column:
            raise CliError("--app and --owner-column apply to the TABLEs served to app clients:"
                           " name them", 2)
        if not services:
            raise CliError("nothing to serve: give --config FILE, or TABLE... with --url", 2)
        run_server(services, host=host, port=port)
