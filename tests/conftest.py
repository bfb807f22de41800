"""Shared fixtures: one real PostgreSQL cluster per test session, a fresh database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest

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
