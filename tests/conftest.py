"""Shared fixtures: one real PostgreSQL cluster per test session, a fresh database per test, and
one MongoDB-wire server (SecantusDB) and one Kafka broker (Tansu) per session, started from the
test extra's PyPI packages unless CHANGEFEED_TEST_MONGODB_URL / CHANGEFEED_TEST_KAFKA_BOOTSTRAP
name real servers (see testservers.py), one Redis server and one Snorky server per session, and a
webhook receiver per test."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from testservers import (
    KAFKA_ENV,
    MONGODB_ENV,
    SNORKY_KEY,
    Receiver,
    Server,
    drop_database,
    start_on_a_free_port,
    start_redis,
    start_secantus,
    start_tansu,
    stop_process,
    wait_for_port,
)

from changefeed.embedded import TemporaryPostgres

_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TemporaryPostgres]:
    """A real PostgreSQL server (wal_level=logical) started from the Debian packages."""
    with TemporaryPostgres() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: TemporaryPostgres) -> Iterator[str]:
    """The URL of a new, empty database on `pg_server`, dropped (with its slots) afterwards."""
    name = f"test_{next(_database_numbers)}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.dsn(name)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        drop_database(conn, name)


@pytest.fixture
def pg(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the `pg_dsn` database."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def mongodb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A MongoDB-wire server: ``$CHANGEFEED_TEST_MONGODB_URL``, else SecantusDB started here."""
    url = os.environ.get(MONGODB_ENV)
    if url:
        yield Server(url, "external")
        return
    try:
        server = start_secantus(tmp_path_factory.mktemp("secantus"))
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; or set {MONGODB_ENV} to a MongoDB replica set")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka broker's bootstrap address: ``$CHANGEFEED_TEST_KAFKA_BOOTSTRAP``, else Tansu."""
    given = os.environ.get(KAFKA_ENV)
    if given:
        yield given
        return
    server = start_tansu(tmp_path_factory.mktemp("tansu"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a throwaway Redis server (Debian's redis-server) for the whole session."""
    directory = str(tmp_path_factory.mktemp("redis"))

    def start(port: int) -> tuple[int, subprocess.Popen]:
        process = start_redis(port, directory)
        wait_for_port(port, process, "redis-server")
        return port, process

    port, process = start_on_a_free_port(start)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process)


@pytest.fixture
def receiver(request) -> Iterator[Receiver]:
    """A webhook receiver that records every request (its arguments: ``indirect`` params)."""
    server = Receiver(*getattr(request, "param", ())).start()
    yield server
    server.stop()


SNORKY_PYTHON_ENV = "CHANGEFEED_TEST_SNORKY_PYTHON"


def snorky_python() -> str | None:
    """The interpreter that has snorky 0.1.0a4: $CHANGEFEED_TEST_SNORKY_PYTHON or .venv-snorky."""
    given = os.environ.get(SNORKY_PYTHON_ENV)
    if given:
        return given
    default = Path(__file__).parents[1] / ".venv-snorky" / "bin" / "python"
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
    launcher = Path(__file__).parent / "pipelines" / "snorky_server.py"

    def start(port: int) -> tuple[int, subprocess.Popen]:
        process = subprocess.Popen([python, str(launcher), str(port), SNORKY_KEY],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_port(port, process, "the Snorky server")
        return port, process

    port, process = start_on_a_free_port(start)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)
