"""Fixtures of the serve tests: the pipeline tests' real Redis and HTTP receivers, and a
``changefeed serve`` process (`serving.Serve`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "pipelines"))  # servers.py

from servers import Receiver, free_port, start_redis, stop_process, wait_for_port  # noqa: E402


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a throwaway Redis server (Debian's redis-server) for the whole session."""
    port = free_port()
    process = start_redis(port, str(tmp_path_factory.mktemp("redis")))
    try:
        wait_for_port(port, process, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver that records every request (see ``tests/pipelines/servers.py``)."""
    server = Receiver().start()
    yield server
    server.stop()
