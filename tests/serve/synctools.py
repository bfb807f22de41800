"""Real servers and real clients for the sync tests: ``changefeed serve`` as a process, the
official ``@electric-sql/client`` in Node, and the table's rows as that client must hold them."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from testservers import ADDRESS_IN_USE, free_port, stop_process
from waiting import wait_until

HERE = Path(__file__).parent
JS = HERE / "js"
CHANGEFEED = Path(sys.executable).parent / "changefeed"


def node_modules() -> Path:
    """``tests/serve/js/node_modules`` (``make test`` installs it; installed here if missing)."""
    modules = JS / "node_modules"
    if not (modules / "@electric-sql" / "client").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed for the sync tests' JavaScript clients (apt-get install"
                        " npm)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True,
                       env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
                       capture_output=True)
    return modules


class Server:
    """``changefeed serve`` (or ``sync_server.py`` with test settings) as a child process."""

    def __init__(self, url: str, tables: Sequence[str], *, port: int | None = None,
                 app: str | None = None, owner_column: str | None = None,
                 settings: dict[str, Any] | None = None, log: Path | None = None) -> None:
        self.url = url
        self.tables = list(tables)
        self.port = port or free_port()
        self.may_move = port is None  # to another free port, until it first started
        self.app = app
        self.owner_column = owner_column
        self.settings = settings
        self.log = log
        self.process: subprocess.Popen | None = None
        self.stderr = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        options = []
        if self.app:
            options += ["--app", self.app]
        if self.owner_column:
            options += ["--owner-column", self.owner_column]
        if self.settings is not None:
            return [sys.executable, str(HERE / "sync_server.py"), str(self.port), self.url,
                    json.dumps(self.settings), *options, *self.tables]
        return [str(CHANGEFEED), "serve", "--url", self.url, "--port", str(self.port),
                *options, *self.tables]

    def start(self, wait: bool = True) -> Server:
        """Start the server (and wait until it is ready). On a port of its own choosing, it
        starts again on another if a process took that one before the server bound it."""
        for attempt in range(3):
            stderr = open(self.log, "a") if self.log else subprocess.PIPE  # noqa: SIM115
            self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                            stderr=stderr, text=True, cwd=HERE,
                                            env={**os.environ, "PYTHONPATH": str(HERE)})
            if not wait:
                break
            try:
                self.wait_ready()
            except AssertionError as exc:
                if not (self.may_move and attempt < 2 and ADDRESS_IN_USE.search(str(exc))):
                    raise
                self.port = free_port()
                continue
            break
        self.may_move = False
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        process = self.process
        assert process is not None

        def ready() -> bool:
            try:
                return get(self.base + "/readyz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(ready, "serve to be ready", timeout, ended=lambda: process.poll() is not None,
                   said=self.errors, step=0.1)

    def errors(self) -> str:
        if self.log is not None and self.log.exists():
            return self.log.read_text()[-4000:]
        if self.process is not None and self.process.stderr is not None and (
                self.process.poll() is not None):
            self.stderr += self.process.stderr.read()
        return self.stderr[-4000:]

    def stop(self) -> int:
        """SIGTERM, and the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no clean stop."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def get(url: str, headers: dict[str, str] | None = None,
        timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """GET ``url``: status, headers (lower-case names), JSON body (or text)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, head, raw = reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, exc.headers, exc.read()
    names = {key.lower(): value for key, value in head.items()}
    try:
        return status, names, json.loads(raw) if raw else None
    except ValueError:
        return status, names, raw.decode()


def post(url: str, body: Any, timeout: float = 60) -> tuple[int, Any]:
    """POST ``body`` (JSON, or bytes as they are): status and JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def shape_url(server: Server, **params: Any) -> str:
    return f"{server.base}/v1/shape?{urllib.parse.urlencode(params)}"


class _Node:
    """One Node process running ``js/shape_client.mjs`` for one or more shapes."""

    def __init__(self, shapes: list[dict[str, Any]]) -> None:
        node_modules()
        self.queues: list[queue.Queue[dict[str, Any]]] = [queue.Queue() for _ in shapes]
        self.histories: list[list[dict[str, Any]]] = [[] for _ in shapes]
        self.process = subprocess.Popen(
            ["node", str(JS / "shape_client.mjs"), json.dumps(shapes)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=JS)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            index = event.get("shape", 0)
            self.histories[index].append(event)
            self.queues[index].put(event)

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_process(self.process)


class ShapeClient:
    """``@electric-sql/client`` in Node syncing one shape (``js/shape_client.mjs``); several
    may share one Node process (`shape_clients`)."""

    def __init__(self, server: Server | None, table: str, *, node: _Node | None = None,
                 index: int = 0, **options: Any) -> None:
        if node is None:
            assert server is not None
            node = _Node([{"url": f"{server.base}/v1/shape", "table": table, **options}])
        self.node = node
        self.index = index
        self.events = node.queues[index]
        self.history = node.histories[index]
        self.last: dict[str, Any] | None = None

    def wait(self, condition: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = 30) -> dict[str, Any]:
        """The latest up-to-date event if its state satisfies ``condition``, else the first
        one to come that does."""
        deadline = time.monotonic() + timeout
        while True:  # what already came first
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if event["event"] == "up-to-date":
                self.last = event
        if self.last is not None and condition(self.last):
            return self.last
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"client never reached: {what}; last: {self.last};"
                                     f" errors: {self.errors()}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event["event"] == "up-to-date":
                self.last = event
                if condition(event):
                    return event

    def wait_rows(self, expected: Callable[[], dict[str, Any]], timeout: float = 30
                  ) -> dict[str, Any]:
        """Wait until the client's rows equal ``expected()`` (read anew at each event)."""
        last_expected: dict[str, Any] = {}

        def equal(event: dict[str, Any]) -> bool:
            nonlocal last_expected
            last_expected = expected()
            return event["rows"] == last_expected
        try:
            return self.wait(equal, "the table's rows", timeout)
        except AssertionError:
            rows = (self.last or {}).get("rows", {})
            missing = {k: v for k, v in last_expected.items() if rows.get(k) != v}
            extra = {k: v for k, v in rows.items() if k not in last_expected}
            raise AssertionError(f"client rows differ: missing/different {missing}, extra"
                                 f" {extra}; errors: {self.errors()}") from None

    def errors(self) -> list[dict[str, Any]]:
        return [event for event in self.history if event["event"] == "error"]

    def refetches(self) -> int:
        return sum(event["event"] == "must-refetch" for event in self.history)

    def stop(self) -> None:
        self.node.stop()

    def __enter__(self) -> ShapeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shape_clients(server: Server, table: str, shapes: Sequence[dict[str, Any]]
                  ) -> list[ShapeClient]:
    """One client per shape options, all in one Node process (stop any of them to stop all)."""
    node = _Node([{"url": f"{server.base}/v1/shape", "table": table, **shape}
                  for shape in shapes])
    return [ShapeClient(None, table, node=node, index=i) for i in range(len(shapes))]


_NUMBER_TYPES = {"int2", "int4", "oid", "float4", "float8"}


def electric_rows(conn: psycopg.Connection, table: str, where: str | None = None,
                  columns: Sequence[str] | None = None,
                  params: Sequence[Any] = ()) -> dict[str, dict[str, Any]]:
    """``table``'s rows matching ``where`` (run by PostgreSQL itself) as the Electric client
    holds them: keyed ``"public"."t"/"1"``, values as PostgreSQL's text parsed by the client's
    default parser (numbers, booleans, JSON; everything else a string)."""
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    info = conn.execute(
        "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum", [f'"{schema}"."{name}"']).fetchall()
    key = [r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary"
        " ORDER BY array_position(i.indkey, a.attnum)", [f'"{schema}"."{name}"']).fetchall()]
    types = dict(info)
    wanted = list(columns) if columns else [r[0] for r in info]
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("SET DateStyle = 'ISO, DMY'")
    conn.execute("SET IntervalStyle = 'iso_8601'")
    # Arrays as JSON (the client parses them into arrays; these tests use text and int ones).
    select = ", ".join(f'to_json("{c}")::text' if types[c].startswith("_") else f'"{c}"::text'
                       for c in wanted)
    keys = ", ".join(f'"{c}"::text' for c in key)
    query = f'SELECT {keys}, {select} FROM "{schema}"."{name}"'
    if where:
        query += f" WHERE {where}"
    rows = {}
    for record in conn.execute(query, list(params) or None).fetchall():
        key_values, values = record[:len(key)], record[len(key):]
        row_key = f'"{schema}"."{name}"' + "".join(f'/"{v}"' for v in key_values)
        rows[row_key] = {c: _parse(types[c], v) for c, v in zip(wanted, values, strict=True)}
    return rows


def _parse(typname: str, text: str | None) -> Any:
    if text is None:
        return None
    if typname in _NUMBER_TYPES:
        return float(text) if "." in text or "e" in text else int(text)
    if typname == "int8":
        return text  # BigInt, printed as its digits
    if typname == "bool":
        return text == "true"
    if typname in ("json", "jsonb") or typname.startswith("_"):
        return json.loads(text)
    return text


ITEMS = """
CREATE TABLE items (
    id int PRIMARY KEY, title text, done boolean NOT NULL DEFAULT false, priority int,
    price numeric(10, 2), due timestamptz, tags text[], meta jsonb, big bigint
)"""


def make_items(pg: psycopg.Connection, count: int = 20) -> None:
    """The ``items`` table of the sync tests, with ``count`` rows of every column type."""
    pg.execute(ITEMS)
    pg.execute(
        "INSERT INTO items SELECT g, CASE WHEN g %% 3 = 0 THEN 'apple ' || g ELSE 'item ' || g"
        " END, g %% 2 = 0, g %% 5, g * 1.25, CASE WHEN g %% 4 = 0 THEN NULL ELSE"
        " timestamptz '2024-05-01 10:00:00+00' + g * interval '5 days' END,"
        " ARRAY['t' || g, 'x y'], CASE WHEN g %% 6 = 0 THEN jsonb_build_object('g', g) END,"
        " g * 3 FROM generate_series(1, %s) g", [count])
