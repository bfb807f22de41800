"""Fixtures of the serve tests: the pipeline tests' HTTP receivers (Redis comes from
``tests/conftest.py``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "pipelines"))  # servers.py

from servers import Receiver  # noqa: E402

# redis_url: tests/conftest.py (shared with the pipeline tests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver that records every request (see ``tests/pipelines/servers.py``)."""
    server = Receiver().start()
    yield server
    server.stop()
