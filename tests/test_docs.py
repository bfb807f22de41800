"""The README's Python examples run as written (or say why they cannot); so do the package's
docstring examples."""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import queue
import re
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from testservers import SNORKY_KEY, subscribe

from changefeed import get_changefeed

README = Path(__file__).parents[1] / "README.md"
NOT_RUNNABLE = "# Not runnable as is: "

RUN_BY_TESTS = {
    "## Use it from Python": "test_the_readme_feed_example_runs_as_written",
    "## Compose a pipeline in Python": "test_the_readme_pipeline_example_runs_as_written",
    "### PostgreSQL, with the CPU-heavy work in other processes":
        "test_the_readme_processes_example_runs_as_written",
    "### Typed rows": "test_the_readme_typed_rows_example_runs_as_written",
    "## Channels": "tests/pipelines/test_channels.py::"
                   "test_the_readme_channels_example_runs_as_written",
}
"""Each runnable block, by the heading it stands under, and the test that runs it."""


def python_blocks() -> list[tuple[str, str]]:
    """Every ```python block of the README, with the heading it stands under."""
    blocks, heading, code = [], "", None
    for line in README.read_text().splitlines(keepends=True):
        if code is not None:
            if line.startswith("```"):
                blocks.append((heading, "".join(code)))
                code = None
            else:
                code.append(line)
        elif line.startswith("```python"):
            code = []
        elif line.startswith("#"):
            heading = line.strip()
    return blocks


def block(heading: str) -> str:
    """The runnable block under ``heading`` (there is one)."""
    (code,) = [code for under, code in python_blocks()
               if under == heading and not code.startswith(NOT_RUNNABLE)]
    return code


def run_as_a_module(code: str, module: types.ModuleType | None = None) -> dict:
    """Run ``code`` as a user's file runs (a module of its own: dataclasses look it up)."""
    module = module or types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, str(README), "exec", dont_inherit=True), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


def test_every_python_block_runs_in_a_test_or_says_why_it_cannot():
    runnable = set()
    for heading, code in python_blocks():
        imports = [node for node in ast.parse(code).body
                   if isinstance(node, (ast.Import, ast.ImportFrom))]
        for node in imports:  # what a user composes comes from the package itself
            names = [node.module] if isinstance(node, ast.ImportFrom) else [
                alias.name for alias in node.names]
            assert not [name for name in names if name and name.startswith("changefeed.")]
        if code.startswith(NOT_RUNNABLE):
            exec(compile(ast.Module(imports, []), str(README), "exec"), {})  # names exist
            continue
        assert heading in RUN_BY_TESTS, f"no test runs the example under {heading!r}"
        assert heading not in runnable, f"two runnable examples under {heading!r}"
        runnable.add(heading)
    assert runnable == set(RUN_BY_TESTS)
    for test in RUN_BY_TESTS.values():
        path, _, name = test.rpartition("::")
        source = Path(__file__).parents[1] / path if path else Path(__file__)
        assert f"def {name}(" in source.read_text()


def test_the_readme_pipeline_example_runs_as_written():
    example = block("## Compose a pipeline in Python")
    assert "MemoryFeed" in example and "assert sink.items ==" in example
    run_as_a_module(example)  # its own asserts check the output


def test_the_readme_typed_rows_example_runs_as_written():
    example = block("### Typed rows")
    assert "typed(Task)" in example and "assert sink.items ==" in example
    run_as_a_module(example)


def run_until_stopped(code: str, namespace: dict, script: Callable[[], None]) -> dict:
    """Run ``code`` (which runs until its ``feed`` is stopped) here, in a module whose globals
    start as ``namespace`` (returned at the end), and ``script`` in a thread that writes and
    watches; the feed is stopped when ``script`` ends, whatever happened."""
    module = types.ModuleType("readme_example")
    module.__dict__.update(namespace)
    namespace = module.__dict__
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            script()
        except BaseException as exc:
            failure.append(exc)
        finally:
            for _ in range(600):  # the example binds `feed` before it reads
                if "feed" in namespace:
                    namespace["feed"].stop()
                    break
                threading.Event().wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_as_a_module(code, module)
    finally:
        watcher.join(30)
    if failure:
        raise failure[0]
    return namespace


@pytest.mark.postgres
def test_the_readme_feed_example_runs_as_written(pg_dsn, pg):
    example = block("## Use it from Python")
    assert "with get_changefeed(" in example
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    pg.execute("INSERT INTO tasks VALUES (1, 'existing')")
    printed: queue.SimpleQueue = queue.SimpleQueue()
    seen = []
    namespace = {"print": lambda *args: printed.put(args)}

    def write_and_watch() -> None:
        seen.append(printed.get(timeout=30))  # the snapshot
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO tasks VALUES (2, 'new')")
            conn.execute("UPDATE tasks SET title = 'renamed' WHERE id = 1")
            conn.execute("DELETE FROM tasks WHERE id = 2")  # not asked for
        seen.extend(printed.get(timeout=30) for _ in range(2))

    run_until_stopped(example.replace("postgresql://app@db/app", pg_dsn), namespace,
                      write_and_watch)
    assert [(op.name, table, key, new) for op, table, key, new in seen] == [
        ("INSERT", "public.tasks", {"id": 1}, {"id": 1, "title": "existing"}),
        ("INSERT", "public.tasks", {"id": 2}, {"id": 2, "title": "new"}),
        ("UPDATE", "public.tasks", {"id": 1}, {"id": 1, "title": "renamed"}),
    ]
    assert printed.empty()
    # Leaving the with block closed the feed with everything acknowledged: nothing comes again.
    with get_changefeed(pg_dsn, "tasks") as again:
        assert list(again.changes(idle_timeout=1, timeout=20)) == []


@pytest.mark.postgres
def test_the_readme_processes_example_runs_as_written(pg_dsn, pg, snorky, tmp_path,
                                                     monkeypatch):
    example = block("### PostgreSQL, with the CPU-heavy work in other processes")
    assert "own_process(" in example and f'key="{SNORKY_KEY}"' in example
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text, done boolean, notes text)")
    pg.execute("INSERT INTO tasks VALUES (1, 'existing', false, 'private')")
    monkeypatch.chdir(tmp_path)  # where its checkpoint file goes
    code = example.replace("postgresql://app@db/app", pg_dsn).replace("http://snorky:8001",
                                                                       snorky)
    deltas = []

    with subscribe(snorky, "AllTasks", None) as subscriber:
        def next_delta() -> dict:
            frame = json.loads(subscriber.recv(timeout=30))
            assert frame["message"]["type"] == "delta", frame
            return frame["message"]["delta"]

        def write_and_watch() -> None:
            deltas.append(next_delta())  # the snapshot, published from the child process
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO tasks VALUES (2, 'new', true, 'private')")
            deltas.append(next_delta())

        namespace = run_until_stopped(code, {}, write_and_watch)
    assert deltas == [
        {"type": "insert", "model": "Task", "data": {"id": 1, "title": "existing", "done": False}},
        {"type": "insert", "model": "Task", "data": {"id": 2, "title": "new", "done": True}},
    ]
    # Acknowledged once Snorky took them: the checkpoint holds the second insert's position.
    saved = json.loads((tmp_path / "tasks.checkpoint").read_text())
    assert list(saved.values()) == [namespace["feed"].acknowledged]
    assert namespace["feed"].acknowledged is not None


@pytest.mark.parametrize("module", [
    "changefeed.pipelines.pipeline",
    "changefeed.pipelines.stages",
    "changefeed.pipelines.where_expressions",
    "changefeed.testing",
])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_docstring_examples_import_from_the_surface():
    """A docstring example shows what a user writes: ``from changefeed import ...``."""
    wrong = []
    for folder in ("changefeed", "backends", "pipelines"):
        for path in (Path(__file__).parents[1] / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.match(r"\s*>>> (from|import) changefeed\.", line):
                    wrong.append(f"{path}: {line.strip()}")
    assert wrong == []
