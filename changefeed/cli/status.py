"""``changefeed status``: what a running ``changefeed serve`` says of itself, as a table.

It reads ``GET /readyz`` (the same JSON as ``/healthz``, with readiness), prints one row per
pipeline (and per other service), and exits 0 when everything is ready, 1 when something is
not, 3 when the server cannot be reached or answers something else than its health.
"""

from __future__ import annotations

import json
from typing import Any

import click

from changefeed.cli.common import CliError, Seconds
from changefeed.redact import redact

COLUMNS = ("SERVICE", "PIPELINE", "STATE", "READY", "DELIVERED", "LAG", "RESTARTS", "ERROR")


def fetch_health(url: str, timeout: float) -> dict[str, Any]:
    """The JSON body of ``url``'s ``/readyz`` (given with a 503 too), or `CliError` (exit 3)."""
    import urllib.error  # here: every other command starts without urllib's 20 ms
    import urllib.request

    endpoint = url.rstrip("/") + "/readyz"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach {redact(endpoint)}: {reason}", 3) from None
    try:
        health = json.loads(body)
        if not isinstance(health.get("services"), dict):
            raise ValueError
    except (ValueError, AttributeError):
        raise CliError(f"{redact(endpoint)} did not answer with changefeed's health (is it"
                       " changefeed serve?)", 3) from None
    return health


def rows(health: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per pipeline, and one per service without pipelines (`COLUMNS`)."""
    table = []
    for service, body in health["services"].items():
        pipelines = body.get("pipelines")
        if not isinstance(pipelines, dict):
            table.append((service, "-", str(body.get("state", "-")), _yes(body.get("ready")),
                          "-", "-", "-", str(body.get("error", ""))))
            continue
        for name, pipeline in pipelines.items():
            lag = pipeline.get("lag_seconds")
            table.append((
                service, name, str(pipeline.get("state", "?")), _yes(pipeline.get("ready")),
                str(pipeline.get("delivered", "-")),
                f"{lag:.1f} s" if isinstance(lag, (int, float)) else "-",
                str(pipeline.get("restarts", "-")), redact(str(pipeline.get("error", ""))),
            ))
    return table


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def render(table: list[tuple[str, ...]]) -> str:
    """``table`` under `COLUMNS`, aligned; the last column as it is."""
    lines = [COLUMNS, *table]
    widths = [max(len(line[index]) for line in lines) for index in range(len(COLUMNS) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out) + "\n"


@click.command()
@click.option("--url", envvar="CHANGEFEED_STATUS_URL", default="http://127.0.0.1:8080",
              show_default=True, metavar="URL",
              help="Where changefeed serve listens (default: $CHANGEFEED_STATUS_URL).")
@click.option("--timeout", type=Seconds(min=0, min_open=True), default=10.0,
              show_default=True, metavar="SECONDS", help="How long to wait for the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON as it is.")
def status(url: str, timeout: float, as_json: bool) -> None:
    """Show the pipelines of a running changefeed serve: state, readiness, deliveries, lag.

    Exits 0 when everything is ready, 1 when something is not, 3 when the server cannot be
    reached.
    """
    health = fetch_health(url, timeout)
    if as_json:
        click.echo(json.dumps(health, indent=2))
    else:
        click.echo(render(rows(health)), nl=False)
        click.echo(f"{health.get('status', '?')}")
    if health.get("status") != "ready":
        raise SystemExit(1)
