"""Running the ``changefeed`` command as a real process, for the CLI tests.

Every wait is on a condition with a deadline that fails the test with what the process said:
a slow machine makes a test slower, never hang or pass by luck.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from procnet import tcp_sockets
from waiting import wait_until

T = TypeVar("T")

CHANGEFEED = [sys.executable, "-m", "changefeed"]
STREAMING = "streaming "
"""What ``changefeed run`` logs once START_REPLICATION succeeded: from then on every commit
reaches it (the slot exists). Not shown with ``--quiet``."""


def run_cli(*args: str, timeout: float = 90, env: dict | None = None):
    """Run ``changefeed ARGS`` to its end; the completed process, output as text."""
    return subprocess.run(
        [*CHANGEFEED, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def json_lines(text: str) -> list[Any]:
    """The JSON objects of ``text``, one per non-empty line."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def whole_lines(text: str) -> str:
    """What a process killed with SIGKILL wrote to a pipe, up to its last newline: the line
    after it may be cut (a change not acknowledged, which comes again)."""
    return text[:text.rfind("\n") + 1]


def json_lines_before_kill(text: str) -> list[Any]:
    """`json_lines` of the `whole_lines` a process killed with SIGKILL wrote."""
    return json_lines(whole_lines(text))


class CliProcess:
    """``changefeed ARGS`` running in the background, its stdout and stderr read with deadlines.

    Both pipes are read together (a child blocked on a full stderr pipe cannot write stdout).
    ``stdout`` may be a file descriptor of the test's own (e.g. a pipe it fills or never reads);
    then only stderr is read here. A None value in ``env`` removes that variable.
    """

    def __init__(self, *args: str, env: dict | None = None, stdout: int | None = None) -> None:
        environ = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            [*CHANGEFEED, *args], stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
            env={name: value for name, value in environ.items() if value is not None},
        )
        self.pid = self.process.pid
        self.args = args
        self.stderr = ""
        """Everything read from stderr so far."""
        self._out = bytearray()
        self._open = [s for s in (self.process.stdout, self.process.stderr) if s is not None]

    def __enter__(self) -> CliProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)
        for stream in self._open:
            stream.close()
        self._open = []

    def _pump(self, timeout: float) -> None:
        """Take what the child wrote within ``timeout`` seconds (returns on the first data)."""
        if not self._open:
            time.sleep(min(timeout, 0.05))  # nothing to read: only the exit is awaited
            return
        readable, _, _ = select.select(self._open, [], [], max(timeout, 0))
        for stream in readable:
            data = os.read(stream.fileno(), 1 << 16)
            if not data:
                self._open.remove(stream)
            elif stream is self.process.stdout:
                self._out += data
            else:
                self.stderr += data.decode(errors="replace")

    def _fail(self, what: str, timeout: float) -> AssertionError:
        return AssertionError(
            f"{what} within {timeout} s (exit code {self.process.poll()}); stderr so far:\n"
            f"{self.stderr}"
        )

    def readline(self, timeout: float = 60) -> str:
        """The next line of stdout; fails if none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out:
            if self.process.stdout not in self._open:
                raise self._fail("stdout ended before a whole line", timeout)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail("no line on stdout", timeout)
            self._pump(remaining)
        line, _, rest = bytes(self._out).partition(b"\n")
        self._out = bytearray(rest)
        return line.decode()

    def read_json(self, count: int, timeout: float = 60) -> list[Any]:
        """The next ``count`` JSON lines of stdout, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        return [json.loads(self.readline(max(deadline - time.monotonic(), 0)))
                for _ in range(count)]

    def wait_for(self, condition: Callable[[], T], what: str, timeout: float = 60) -> T:
        """`waiting.wait_until` while reading the process's output: fails with its stderr if
        ``condition()`` is not true within ``timeout`` seconds or once the process ended."""
        return wait_until(condition, what, timeout, ended=self._ended,
                          said=lambda: f"(exit code {self.process.poll()}) {self.stderr}",
                          pause=self._pump, step=0.05)

    def _ended(self) -> bool:
        """Whether the process ended and everything it wrote was read."""
        return self.process.stderr not in self._open and self.process.poll() is not None

    def wait_for_stderr(self, fragment: str, timeout: float = 60, count: int = 1) -> None:
        """Wait until stderr says ``fragment`` (``count`` times); fail if it does not within
        ``timeout`` s."""
        self.wait_for(lambda: self.stderr.count(fragment) >= count,
                      f"{count} x {fragment!r} on stderr", timeout)

    def wait_streaming(self, timeout: float = 60) -> None:
        """Wait for the line saying the stream is open (every later commit will come)."""
        self.wait_for_stderr(STREAMING, timeout)

    def close_stdout(self) -> None:
        """Go away as a reader would (``| head -n 1``): close the read end of stdout."""
        stdout = self.process.stdout
        assert stdout is not None
        if stdout in self._open:
            self._open.remove(stdout)
        stdout.close()

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the exit, reading both pipes to their end: (exit code, rest of stdout)."""
        deadline = time.monotonic() + timeout
        while self._open or self.process.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.kill()
                raise self._fail("the process did not end", timeout)
            self._pump(remaining)
        returncode = self.process.wait()
        rest, self._out = bytes(self._out).decode(), bytearray()
        return returncode, rest

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
        """Send ``signum`` (default SIGTERM) and `finish`. After a SIGKILL, also wait until
        the PostgreSQL server of ``--url`` let go of the process's replication connections:
        its walsender notices the crash only when it next looks at the socket, and a rerun
        finding the slot still in use fails (a loaded machine's walsender may take a while)."""
        ports = tcp_ports(self.pid) if signum == signal.SIGKILL else set()
        self.process.send_signal(signum)
        result = self.finish(timeout)
        if ports and "--url" in self.args:
            released(self.args[self.args.index("--url") + 1], ports, timeout)
        return result

    def wait_blocked_writing(self, timeout: float = 60) -> None:
        """Wait until one of the process's threads (the sink's, in a pipeline) sleeps in a
        write to a full pipe (Linux: its wchan)."""
        tasks = Path(f"/proc/{self.pid}/task")

        def blocked() -> bool:
            for task in tasks.iterdir():
                try:
                    if "pipe_write" in (task / "wchan").read_text():
                        return True
                except OSError:  # a thread that ended meanwhile
                    pass
            return False

        self.wait_for(blocked, "the process to block writing to its stdout", timeout)


def tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds (Linux: /proc)."""
    return {port for port, _ in tcp_sockets(pid)}


def released(url: str, ports: set[int], timeout: float = 60) -> None:
    """Wait until no walsender of the server at ``url`` serves a client on ``ports`` (a
    process that was killed) and no slot is held by one."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        walsenders = [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'"
            " AND client_port = ANY(%s)", [list(ports)])]

        def gone() -> bool:
            return not conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) UNION ALL"
                " SELECT active_pid FROM pg_replication_slots WHERE active_pid = ANY(%s)",
                [walsenders, walsenders]).fetchall()

        if walsenders:
            wait_until(gone, f"the walsenders {walsenders} of a killed process to end", timeout)


def start_cli(*args: str, env: dict | None = None, stdout: int | None = None) -> CliProcess:
    """Start ``changefeed ARGS`` in the background (see `CliProcess`)."""
    return CliProcess(*args, env=env, stdout=stdout)


def assert_one_clear_line(result, *fragments: str) -> None:
    """A failure shown as exactly one error line containing ``fragments``, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], result.stderr


def assert_exit(result, code: int, *fragments: str) -> None:
    """``result`` exited with ``code`` after one clear error line containing ``fragments``."""
    assert_one_clear_line(result, *fragments)
    assert result.returncode == code, (result.returncode, result.stderr)
