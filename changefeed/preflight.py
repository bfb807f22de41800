"""Checks made before a run connects: what would otherwise fail only after the first change.

A checkpoint file that cannot be written fails on the first acknowledgement, after the first
change was already delivered; a sink file in a missing directory fails on the first batch; a
malformed PostgreSQL URL fails only when the feed connects. These functions raise
`ConfigurationError` with one clear line instead, before anything is read or written.
"""

from __future__ import annotations

import os
import re

from changefeed.errors import ConfigurationError, first_line

_CONNINFO = re.compile(r"\s*[A-Za-z_]+\s*=")
"""How a libpq ``key=value`` connection string starts (``host=db dbname=app``)."""


def looks_like_conninfo(text: str) -> bool:
    """Whether ``text`` is a libpq ``key=value`` connection string rather than a URL."""
    return "://" not in text and _CONNINFO.match(text) is not None


def check_writable(path: str | os.PathLike[str], what: str) -> None:
    """Raise `ConfigurationError` unless ``path`` can be created or appended to.

    ``what`` names the file in the message (``checkpoint``, ``sink file``).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigurationError(f"cannot write {what} {path}: it is a directory")
    if not os.path.isdir(directory):
        problem = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ConfigurationError(f"cannot write {what} {path}: directory {directory} {problem}")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ConfigurationError(f"cannot write {what} {path}: permission denied")
    elif not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"cannot write {what} {path}: no permission to create files in {directory}"
        )


def check_postgresql_dsn(dsn: str) -> None:
    """Raise `ConfigurationError` for a PostgreSQL URL or conninfo string libpq cannot use:
    bad syntax (``postgresql://[bad``), unknown options, a port that is not a port."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg.ProgrammingError, with libpq's own words
        raise ConfigurationError(f"bad PostgreSQL URL: {first_line(exc)}") from exc
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigurationError(
                f"bad PostgreSQL URL: port {port!r} is not a number from 1 to 65535"
            )


__all__ = ["check_postgresql_dsn", "check_writable", "looks_like_conninfo"]
