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


BACKEND_MODULE = '''
from changefeed.registry import register_backend
from changefeed.testing import MemoryFeed


class Connection:
    """The driver's connection type."""


class LogFeed(MemoryFeed):
    def __init__(self, table, operation=7, *, prefeed=None, connection=None, **options):
        super().__init__(table, operation, prefeed=prefeed, connection=connection, **options)


def check(url):
    from changefeed import ConfigurationError
    if "bad" in url:
        raise ConfigurationError("bad LogDB URL")


register_backend("logdb", LogFeed, connection_types=[Connection], check_url=check)
'''


def test_a_declared_backend_is_imported_on_first_use_and_serves_its_urls_and_connections(
    tmp_path, monkeypatch
):
    from changefeed import ConfigurationError, get_changefeed, registry
    from changefeed.registry import Backend

    (tmp_path / "logdb_backend.py").write_text(BACKEND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    monkeypatch.setitem(registry._DECLARED, "logdb", Backend(
        "logdb", "LogDB", "logdb_backend", schemes=("logdb",), drivers=("logdb_backend",)))
    assert "logdb_backend" not in sys.modules  # declared, not imported
    assert registry.backend_for_url("LOGDB://host/x").title == "LogDB"

    feed = get_changefeed("logdb://host/x", "events", prefeed=[1])
    assert type(feed).__name__ == "LogFeed" and feed.connection == "logdb://host/x"
    assert "logdb_backend" in sys.modules
    connection = sys.modules["logdb_backend"].Connection()
    assert get_changefeed(connection, "events").connection is connection
    with pytest.raises(ConfigurationError, match="bad LogDB URL"):
        get_changefeed("logdb://bad/x", "events")
    del sys.modules["logdb_backend"]


def test_a_declared_backend_without_its_driver_says_which_extra_to_install(monkeypatch):
    from changefeed import ConfigurationError, get_changefeed, registry
    from changefeed.registry import Backend

    monkeypatch.setitem(registry._DECLARED, "nosuchdb", Backend(
        "nosuchdb", "NoSuchDB", "changefeed_nosuchdb_backend", schemes=("nosuchdb",)))
    with pytest.raises(ConfigurationError, match=r"pip install 'changefeed\[nosuchdb\]'"):
        get_changefeed("nosuchdb://host/x", "events")


def test_the_registry_examples():
    import doctest

    from changefeed import registry

    result = doctest.testmod(registry)
    assert result.attempted > 0 and result.failed == 0
