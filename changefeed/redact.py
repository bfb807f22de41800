"""Keep secrets out of what the program writes: `redact` hides the credentials in URLs.

URLs carry secrets in two places: the userinfo (``https://user:password@host``, or a bare
token as ``https://TOKEN@host``) and the query string (``?token=...``, ``?key=...``; a
``snorky+http://`` sink's backend key lives there). Rather than guess which parameter names
are secret, the whole userinfo, query and fragment are replaced::

    >>> redact("POST https://bot:hunter2@hooks.example.com/x?token=abc failed")
    'POST https://***@hooks.example.com/x?*** failed'
    >>> redact("host=db password='p w' dbname=app")
    'host=db password=*** dbname=app'

It works on any text, so error messages of libraries (httpx, redis) that quote the URL are
covered too: the CLI applies it to every log record, to its one-line errors and to
tracebacks (`RedactingFormatter`, `install_excepthook`). Secrets no rule can recognise (a token
``changefeed serve`` took from the environment for its config) are masked wherever they appear
once given to `register_secret`.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from types import TracebackType

_URL = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<authority>[^/?#\s'\"<>]*)"
    r"(?P<path>[^?#\s'\"<>]*)"
    r"(?P<query>\?[^#\s'\"<>]*)?"
    r"(?P<fragment>#[^\s'\"<>]*)?"
)
# libpq's key=value strings: the password may be quoted and contain spaces.
_CONNINFO_PASSWORD = re.compile(r"\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)

MASK = "***"
_SECRETS: list[str] = []
"""Exact strings to mask, longest first (see `register_secret`)."""


def _redact_url(match: re.Match[str]) -> str:
    authority = match["authority"]
    if "@" in authority:
        authority = MASK + "@" + authority.rpartition("@")[2]
    query = "?" + MASK if match["query"] else ""
    fragment = "#" + MASK if match["fragment"] else ""
    return match["scheme"] + authority + match["path"] + query + fragment


def redact(text: str) -> str:
    """``text`` with the userinfo, query string and fragment of every URL in it replaced by
    ``***`` (and libpq ``password=...`` values too)."""
    if "://" in text:
        text = _URL.sub(_redact_url, text)
    if "password" in text.lower():
        text = _CONNINFO_PASSWORD.sub(r"\1" + MASK, text)
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def register_secret(value: str) -> None:
    """Make `redact` mask ``value`` wherever it appears from now on, in this process.

    For secrets that the URL rules cannot tell apart from other text, such as a token taken
    from the environment; values shorter than 4 characters are ignored (masking them would
    hide ordinary words and numbers while protecting nothing)."""
    if len(value) >= 4 and value not in _SECRETS:
        _SECRETS.append(value)
        _SECRETS.sort(key=len, reverse=True)


class RedactingFormatter(logging.Formatter):
    """A formatter whose whole output (message, exception text, stack) goes through `redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install_excepthook() -> None:
    """Make an unexpected traceback (a bug) go through `redact` too before it is printed."""

    def hook(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

    sys.excepthook = hook


__all__ = ["MASK", "RedactingFormatter", "install_excepthook", "redact", "register_secret"]
