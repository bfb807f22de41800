"""What hangs, for the tests that kill a parent and check that nothing it started lives on: an
HTTP endpoint that takes requests and never answers, and a stage that never returns."""

from __future__ import annotations

import socket
import threading

STUCK_STAGE = '''
import os
import time

def stuck(change):
    """A stage that takes far longer than any test: stands for a long computation."""
    if "STUCK_MARK" in os.environ:  # tells the test the stage has begun
        open(os.environ["STUCK_MARK"], "w").close()
    time.sleep(600)
    return change
'''
"""A module with the stage ``stuck``: write it as ``stuck_stage.py`` on the stage path."""


class Silent:
    """An HTTP endpoint that takes requests and never answers (a hung receiver)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.requested = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if conn.recv(1 << 16):
                self.requested.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
