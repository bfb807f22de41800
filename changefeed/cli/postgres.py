"""The PostgreSQL maintenance commands: ``slots``, ``drain`` and ``backfill``."""

from __future__ import annotations

import math
from typing import Any

import click

from changefeed.bounds import MAX_COUNT
from changefeed.cli.common import (
    Seconds,
    expected_errors,
    require_postgresql,
    url_option,
)


@click.command()
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
    require_postgresql(url, "changefeed slots manages PostgreSQL replication slots: give a"
                            " postgresql:// URL")
    from changefeed.backends.postgres import slots as pg_slots

    with expected_errors():
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


@click.command()
@url_option
@click.option("--slot", required=True, metavar="NAME", help="The replication slot to check.")
@click.option("--timeout", type=Seconds(), default=300.0, show_default=True,
              metavar="SECONDS", help="Give up after this long.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr, only the result.")
def drain(url: str, slot: str, timeout: float, quiet: bool) -> None:
    """Wait until the slot's consumer has delivered everything committed before this call.

    Exits 0 once the slot's confirmed position passes the WAL position read at the start;
    on timeout exits 1 saying how far behind the slot is. A deploy runs it before a migration
    that old notifications or old rows could not survive.
    """
    require_postgresql(url, "changefeed drain checks PostgreSQL replication slots: give a"
                            " postgresql:// URL")
    from changefeed.backends.postgres.drain import describe
    from changefeed.backends.postgres.drain import drain as drain_slot

    def report(state: Any) -> None:
        if not quiet:
            click.echo(f"changefeed: waiting: {describe(state)}", err=True)

    with expected_errors():
        state = drain_slot(url, slot, timeout=timeout, report=report)
    click.echo(describe(state))


def _parse_size(text: str) -> int:
    """``512MB``, ``1GB``, ``1048576``: a byte count from 0 to `MAX_COUNT` (a usage error on
    anything else: a negative size, ``nan``, ``inf``, more bytes than PostgreSQL counts)."""
    units = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    number, unit = text.strip().upper().rstrip("B") or "0", ""
    for suffix in ("K", "M", "G", "T"):
        if number.endswith(suffix):
            number, unit = number[:-1], suffix + "B"
    try:
        value = float(number.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 512MB or 1GB") from None
    if not (math.isfinite(value) and 0 <= value * units[unit] <= MAX_COUNT):
        raise click.BadParameter(f"{text!r} is not a size from 0 to 8EB (such as 512MB or 1GB)")
    return int(value * units[unit])


@click.command()
@click.argument("tables", nargs=-1, required=True, metavar="TABLE...")
@url_option
@click.option("--slot", required=True, help="The slot of the feed that is to back-fill.")
def backfill(tables: tuple[str, ...], url: str, slot: str) -> None:
    """Ask the feed of --slot to back-fill TABLE... while it streams.

    The request goes through the slot: a running feed starts reading the tables in
    primary-key chunks at once, a stopped one when it next runs.
    """
    require_postgresql(url, "changefeed backfill works on PostgreSQL slots: give a"
                            " postgresql:// URL")
    from changefeed.backends.postgres.backfill_requests import request_backfills

    with expected_errors():
        requested = request_backfills(url, slot, tables)
    click.echo(f"back-fill of {', '.join(requested)} requested on slot {slot}", err=True)


def _bytes(count: int | None) -> str:
    from changefeed.backends.postgres.slots import format_size

    return "-" if count is None else format_size(count)
