"""Helpers for tests that run a real server in a subprocess or a thread.

`free_port`, `wait_for_port`, `start_redis` and `stop_process` come from
``tests/testservers.py``, shared by every suite.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from testservers import free_port, start_redis, stop_process, wait_for_port

__all__ = ["SNORKY_KEY", "Handler", "Receiver", "free_port", "start_redis", "stop_process",
           "wait_for_port", "wait_until"]

SNORKY_KEY = "swordfish"
"""The backend key the test Snorky server expects in ``X-Backend-Key``."""


def wait_until(condition, seconds: float = 30.0, what: str = "the condition") -> None:
    """Poll ``condition()`` until it is true; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds} s")
        time.sleep(0.02)


class Receiver(ThreadingHTTPServer):
    """Records every request; answers ``fail_first`` requests with ``fail_status``, each after
    ``delay`` seconds (or when `release` is set, which ends every wait)."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, port: int = 0,
                 delay: float = 0.0, host: str = "127.0.0.1") -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
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
