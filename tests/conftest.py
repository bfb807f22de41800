"""Shared fixtures: one real PostgreSQL cluster per test session, a fresh database per test, and
one MongoDB-wire server (SecantusDB) and one Kafka broker (Tansu) per session, started from the
test extra's PyPI packages unless CHANGEFEED_TEST_MONGODB_URL / CHANGEFEED_TEST_KAFKA_BOOTSTRAP
name real servers (see testservers.py), and one Redis server per session."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest
from testservers import (
    KAFKA_ENV,
    MONGODB_ENV,
    Server,
    free_port,
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
        for (pid,) in conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE database = %s AND active", [name]
        ).fetchall():
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        slots = conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [name]
        ).fetchall()
        for (slot,) in slots:
            for _ in range(50):
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
                    break
                except psycopg.errors.ObjectInUse:
                    import time

                    time.sleep(0.1)
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


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
    port = free_port()
    process = start_redis(port, str(tmp_path_factory.mktemp("redis")))
    try:
        wait_for_port(port, process, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process)
