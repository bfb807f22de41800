"""Running the ``changefeed`` command as a real process, for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys

CHANGEFEED = [sys.executable, "-m", "changefeed"]


def run_cli(*args: str, timeout: float = 90, env: dict | None = None):
    """Run ``changefeed ARGS`` to its end; the completed process, output as text."""
    return subprocess.run(
        [*CHANGEFEED, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_cli(*args: str) -> subprocess.Popen:
    """Start ``changefeed ARGS`` in the background, stdout and stderr piped as text."""
    return subprocess.Popen(
        [*CHANGEFEED, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_one_clear_line(result, *fragments: str) -> None:
    """A failure shown as exactly one error line containing ``fragments``, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], result.stderr
