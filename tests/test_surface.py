"""The public surface: what a user composes comes from ``import changefeed``, which stays quick
and imports no database driver until a name that needs one is used."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from feeds import FAST_RETRY

import changefeed
from changefeed import get_changefeed

DRIVERS = ("psycopg", "pymongo", "rethinkdb", "redis", "confluent_kafka", "httpx", "starlette")
SURFACE = Path(changefeed.__file__)


def fresh(script: str) -> list[str]:
    """The lines ``script`` prints in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_importing_changefeed_imports_no_driver_and_no_pipeline_or_backend():
    loaded = fresh(
        "import sys, changefeed\n"
        f"print(sorted(m for m in {DRIVERS!r} if m in sys.modules))\n"
        "print(sorted(m for m in sys.modules"
        " if m.startswith(('changefeed.pipelines', 'changefeed.backends'))))"
    )
    assert loaded == ["[]", "[]"]


@pytest.mark.parametrize(("name", "driver"), [
    ("PostgresChangeFeed", "psycopg"),
    ("MongoChangeFeed", "pymongo"),
    ("RethinkChangeFeed", "rethinkdb"),
    ("RedisStreamFeed", "redis"),
    ("KafkaFeed", "confluent_kafka"),
    ("WebhookSink", "httpx"),
    ("RedisStreamSink", "redis"),
    ("KafkaSink", "confluent_kafka"),
])
def test_a_name_needing_a_driver_imports_it_on_first_use(name, driver):
    assert fresh(
        "import sys, changefeed\n"
        f"before = {driver!r} in sys.modules\n"
        f"from changefeed import {name}\n"
        f"print(before, {driver!r} in sys.modules, {name}.__name__)"
    ) == [f"False True {name}"]


def test_every_public_name_is_the_object_of_its_home_module():
    lazy = changefeed._LAZY
    for name in changefeed.__all__:
        value = getattr(changefeed, name)
        if name in lazy:
            assert value is getattr(importlib.import_module(lazy[name]), name), name
    assert changefeed.testing is importlib.import_module("changefeed.testing")
    assert changefeed.Pipeline is importlib.import_module("changefeed.pipelines").Pipeline


def test_dir_and_all_list_the_whole_surface():
    assert dir(changefeed) == sorted(changefeed.__all__)
    assert set(changefeed._LAZY) | {"testing"} <= set(changefeed.__all__)
    assert len(set(changefeed.__all__)) == len(changefeed.__all__)
    names = fresh("from changefeed import *\nprint(sorted(k for k in dir() if k[0] != '_'))")
    assert names == [str(sorted(changefeed.__all__))]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Pipelines'"):
        changefeed.Pipelines  # noqa: B018
    with pytest.raises(ImportError):
        exec("from changefeed import where_expressions_parser", {})


def test_the_type_checking_imports_are_the_lazy_names():
    """Type checkers and readers see the lazy names through ``if TYPE_CHECKING:`` imports:
    the same names from the same modules as the table the surface loads them by."""
    tree = ast.parse(SURFACE.read_text())
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    imported = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            imported[alias.name] = node.module
    assert imported.pop("testing") == "changefeed"
    assert imported == changefeed._LAZY


# -- feeds are context managers --------------------------------------------------------------



@pytest.mark.postgres
@pytest.mark.parametrize("with_block", [True, False])
def test_leaving_with_closes_the_feed_which_records_its_last_acknowledgement(
    pg_dsn, pg, request, with_block
):
    pg.execute("CREATE TABLE tasks (id serial PRIMARY KEY, title text)")

    def consume(feed):
        assert list(feed.changes(timeout=0.2)) == []  # creates the slot
        pg.execute("INSERT INTO tasks (title) VALUES ('a'), ('b')")
        got = list(feed.changes(idle_timeout=1, timeout=20))
        assert [change.new["title"] for change in got] == ["a", "b"]
        feed.ack(got[-1].position)  # after the stream closed: only close() tells the server

    feed = get_changefeed(pg_dsn, "tasks", retry=FAST_RETRY)
    if with_block:
        with feed as entered:
            assert entered is feed
            consume(feed)
    else:  # what forgetting to close it leaves behind
        consume(feed)
        request.addfinalizer(feed.close)
    pg.execute("INSERT INTO tasks (title) VALUES ('c')")
    with get_changefeed(pg_dsn, "tasks", retry=FAST_RETRY) as again:
        titles = [change.new["title"] for change in again.changes(idle_timeout=1, timeout=20)]
    assert titles == (["c"] if with_block else ["a", "b", "c"])
    active = pg.execute(
        "SELECT active FROM pg_replication_slots WHERE slot_name = 'changefeed_tasks'"
    ).fetchone()
    assert active == (False,)
