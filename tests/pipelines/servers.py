"""Helpers for tests that run a real server in a subprocess or a thread."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SNORKY_KEY = "swordfish"
"""The backend key the test Snorky server expects in ``X-Backend-Key``."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, seconds: float = 10.0) -> None:
    """Wait until something accepts connections on ``port``; fail if ``process`` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"{what} exited with {process.returncode}: {output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"{what} did not listen on port {port} within {seconds} s")


class Receiver(ThreadingHTTPServer):
    """Records every request; answers ``fail_first`` requests with ``fail_status``."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for headers, body, status in self.requests if status == 200]


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
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
