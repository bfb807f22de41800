"""get_changefeed imports a backend only when a URL or a driver's connection needs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
import changefeed
import psycopg
import pymongo

assert not [m for m in sys.modules if m.startswith("changefeed.backends.")], "imported eagerly"
with psycopg.connect(sys.argv[1]) as conn:
    print(type(changefeed.get_changefeed(conn, "tasks")).__name__)
client = pymongo.MongoClient("mongodb://127.0.0.1:1/", connect=False)
print(type(changefeed.get_changefeed(client, "app.tasks")).__name__)
print(type(changefeed.get_changefeed(client["app"]["tasks"], "tasks")).__name__)
try:
    changefeed.get_changefeed(object(), "tasks")
except changefeed.ConfigurationError as exc:
    print(exc.message)
"""


@pytest.mark.postgres
def test_driver_connections_find_their_backend_in_a_fresh_interpreter(pg_dsn):
    result = subprocess.run([sys.executable, "-c", SCRIPT, pg_dsn], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "PostgresChangeFeed",
        "MongoChangeFeed",
        "MongoChangeFeed",
        "no changefeed backend for a builtins.object; pass a psycopg, pymongo or rethinkdb"
        " connection, or a URL",
    ]


def test_starting_the_cli_imports_no_driver():
    script = ("import sys, changefeed.cli; "
              "print(sorted(m for m in ('psycopg', 'pymongo', 'rethinkdb') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
