"""Fixtures of the pipeline tests: real HTTP and Snorky servers (Redis: tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import SNORKY_KEY, Receiver, free_port, wait_for_port


@pytest.fixture
def receiver(request) -> Iterator[Receiver]:
    server = Receiver(*getattr(request, "param", ())).start()
    yield server
    server.stop()




SNORKY_PYTHON_ENV = "CHANGEFEED_TEST_SNORKY_PYTHON"


def snorky_python() -> str | None:
    """The interpreter that has snorky 0.1.0a4: $CHANGEFEED_TEST_SNORKY_PYTHON or .venv-snorky."""
    given = os.environ.get(SNORKY_PYTHON_ENV)
    if given:
        return given
    default = Path(__file__).parents[2] / ".venv-snorky" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.fixture(scope="session")
def snorky() -> Iterator[str]:
    """The base URL of a real Snorky DataSync server (snorky 0.1.0a4, see snorky_server.py).

    Snorky pins tornado 4.5.3, so it lives in a virtualenv of its own that ``make install``
    creates (``.venv-snorky``); the server runs as a subprocess of that interpreter.
    """
    python = snorky_python()
    if python is None:
        pytest.skip(f"no Snorky interpreter: run `make install` (it creates .venv-snorky) or set"
                    f" {SNORKY_PYTHON_ENV} to a Python with snorky==0.1.0a4")
    port = free_port()
    launcher = Path(__file__).with_name("snorky_server.py")
    process = subprocess.Popen([python, str(launcher), str(port), SNORKY_KEY],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, process, "the Snorky server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
