"""``changefeed demo --web`` in a real headless Chromium (Debian's ``chromium``): the page syncs
the table live, takes edits offline (queued), and catches up when the network comes back."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from synctools import CHANGEFEED, JS, get, node_modules
from testservers import free_port
from waiting import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


class Browser:
    """``js/browser.mjs``: one command per line, one answer each."""

    def __init__(self) -> None:
        node_modules()
        if not Path(CHROMIUM).exists():
            pytest.fail(f"{CHROMIUM} is missing: make test installs Debian's chromium"
                        " (.ci/system-deps.sh)")
        self.process = subprocess.Popen(
            ["node", str(JS / "browser.mjs")], cwd=JS, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ,
                                                                 "CHROMIUM": CHROMIUM})
        assert self.answer().get("ready"), "the browser did not start"

    def answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the browser driver ended: {self.process.stderr.read()}")
        return json.loads(line)

    def __call__(self, cmd: str, **arguments: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **arguments}) + "\n")
        self.process.stdin.flush()
        reply = self.answer()
        assert reply["ok"], reply
        return reply.get("value")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self("close")
            except (AssertionError, BrokenPipeError):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def until(condition: Any, what: str, timeout: float = 30) -> Any:
    """`wait_until`, looking every 0.2 s: each look at the page is a call into the browser."""
    return wait_until(condition, what, timeout, step=0.2)


def titles(conn: psycopg.Connection) -> list[str]:
    return sorted(row[0] for row in conn.execute("SELECT title FROM tasks"))


def page_titles(browser: Browser) -> list[str]:
    return sorted(browser("eval", js="window.demo.visible().map(r => r.title)"))


@pytest.fixture
def demo(tmp_path: Path) -> Any:
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [str(CHANGEFEED), "demo", "--web", "--port", str(port), "--writer-seconds", "0"],
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        until(lambda: "database: " in log.read_text() or process.poll() is not None,
              "the demo's database", 60)
        found = re.search(r"database: psql -h 127.0.0.1 -p (\d+)", log.read_text())
        assert found, log.read_text()
        dsn = f"postgresql://postgres@127.0.0.1:{found.group(1)}/postgres"

        def ready() -> bool:
            try:
                return get(f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200
            except OSError:
                return False
        until(ready, "the demo server", 60)
        yield port, dsn, log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_demo_page_syncs_live_queues_offline_edits_and_catches_up(
    demo: Any, tmp_path: Path
) -> None:
    port, dsn, log = demo
    browser = Browser()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            browser("goto", url=f"http://127.0.0.1:{port}/demo")
            browser("wait", js="window.demo && window.demo.store.status === 'live'")
            until(lambda: page_titles(browser) == titles(conn), "the initial rows")
            # Live: a write in the database shows up on the page.
            conn.execute("INSERT INTO tasks (title, priority) VALUES ('written by the test', 4)")
            browser("wait", js="window.demo.visible().some(r => r.title === 'written by the test')")
            # Online edit through the page's form: it reaches the database.
            browser("fill", selector="#new-title", value="added online")
            browser("press", selector="#new-title", key="Enter")
            until(lambda: "added online" in titles(conn), "the online write in the database")
            # Offline: edits apply on the page and wait in the queue.
            browser("offline", value=True)
            browser("wait", js="window.demo.store.status === 'offline'", timeout=30000)
            row = "tr[data-title='edit me offline']"
            browser("fill", selector=f"{row} input.title", value="edited offline")
            browser("press", selector=f"{row} input.title", key="Enter")
            browser("click", selector="tr[data-title='tick me'] input[type=checkbox]")
            browser("fill", selector="#new-title", value="added offline")
            browser("press", selector="#new-title", key="Enter")
            browser("wait", js="window.demo.queue.pending.length === 3")
            assert "edited offline" in page_titles(browser)
            assert "added offline" in page_titles(browser)
            browser("screenshot", path=str(tmp_path / "offline.png"))
            # Meanwhile the database changes too.
            conn.execute("UPDATE tasks SET title = 'changed while offline' WHERE title ="
                         " 'written by the test'")
            conn.execute("DELETE FROM tasks WHERE title = 'try changefeed'")
            time.sleep(1.0)  # time for a write that must not happen
            assert "edited offline" not in titles(conn)  # nothing left the browser
            # Back online: the queue is sent, and the page catches up with the database.
            browser("offline", value=False)
            browser("wait", js="window.demo.queue.pending.length === 0", timeout=30000)
            until(lambda: page_titles(browser) == titles(conn)
                  and browser("eval", js="window.demo.store.status") == "live",
                  "the page to catch up")
            assert {"edited offline", "added offline", "changed while offline"} <= set(
                titles(conn))
            assert "try changefeed" not in page_titles(browser)
            assert conn.execute("SELECT done FROM tasks WHERE title = 'tick me'").fetchone() == (
                True,)
            browser("screenshot", path=str(tmp_path / "online.png"))
            errors = [line for line in browser("logs") if line.startswith("pageerror")]
            assert errors == []
    finally:
        browser.close()
