"""A ``changefeed`` process whose stdout and stderr are read as they come, for tests that act
while it runs (signals, server restarts) and wait on what it printed."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
from clitools import CHANGEFEED


class LiveRun:
    """``changefeed ARGS`` in the background; `stdout` and `stderr` fill with its lines."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*CHANGEFEED, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    @property
    def out(self) -> str:
        return "".join(self.stdout)

    def wait_for(self, condition, seconds: float = 60.0, what: str = "it") -> None:
        """Wait until ``condition()``; fail (showing stderr) after ``seconds`` or if it exits."""
        deadline = time.monotonic() + seconds
        while not condition():
            if self.process.poll() is not None:
                self._join()
                if condition():
                    return
                pytest.fail(f"changefeed exited ({self.process.returncode}) before {what}:"
                            f"\n{self.err}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{what} did not happen within {seconds} s:\n{self.err}")
            time.sleep(0.05)

    def wait_for_stderr(self, text: str, count: int = 1, seconds: float = 60.0) -> None:
        self.wait_for(lambda: self.err.count(text) >= count, seconds, f"{count} x {text!r}")

    def terminate(self, seconds: float) -> float:
        """SIGTERM; fail unless it exits within ``seconds``; how long it took."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"changefeed did not exit within {seconds} s of SIGTERM:\n{self.err}")
        self._join()
        return time.monotonic() - began

    def wait(self, seconds: float = 90.0) -> int:
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"changefeed did not exit within {seconds} s:\n{self.err}")
        self._join()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._join()

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(10)
