"""A throwaway PostgreSQL (`changefeed.embedded.TemporaryPostgres`, ``changefeed demo``) does not
outlive the process that made it: killed with SIGKILL, its server stops and its directory goes
within `BOUND` seconds; a clean exit leaves no guard process behind. A port taken between its
choice and the server's start moves the new cluster to another."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from clitools import CHANGEFEED
from proctools import descendants, wait_ended
from waiting import wait_until

from changefeed import embedded

pytestmark = pytest.mark.postgres

BOUND = 20.0
"""Seconds within which the server and its directory must be gone (pg_ctl stop -m immediate)."""

HOLDER = """
import sys, time
from changefeed.embedded import TemporaryPostgres
server = TemporaryPostgres()
server.start()
print(server.directory, flush=True)
time.sleep(600)
"""


@pytest.fixture
def tmpdir_for_clusters():
    """A TMPDIR the cluster's unprivileged owner can reach (pytest's own is root's only)."""
    directory = tempfile.mkdtemp(prefix="changefeed-guard-test-", dir="/tmp")
    os.chmod(directory, 0o755)
    yield Path(directory)
    subprocess.run(["rm", "-rf", directory], check=False)


def postmaster(datadir: Path, seconds: float = 60) -> int:
    wait_until((datadir / "postmaster.pid").exists, "the server to start", seconds)
    return int((datadir / "postmaster.pid").read_text().split()[0])


def assert_cleaned_up(directory: Path, server_pid: int, started: list[int]) -> None:
    wait_ended([server_pid, *started], BOUND, "the cluster of a killed process")
    wait_until(lambda: not directory.exists(), f"{directory} to be removed", BOUND)


@pytest.mark.parametrize("how", ["library", "demo"])
def test_a_killed_process_leaves_no_server_and_no_directory(how, tmpdir_for_clusters):
    env = {**os.environ, "TMPDIR": str(tmpdir_for_clusters)}
    if how == "library":
        argv = [sys.executable, "-c", HOLDER]
    else:
        argv = [*CHANGEFEED, "demo", "--seconds", "0"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if how == "library":
            directory = Path(process.stdout.readline().decode().strip())
        else:
            process.stdout.readline()  # the first delta: the cluster is up and streaming
            (directory,) = tmpdir_for_clusters.glob("changefeed-pg-*")
        server = postmaster(directory / "data")
        started = descendants(process.pid)  # the guard (the server is pg_ctl's, not ours)
        assert started, "no guard process"
        process.kill()
        process.wait(30)
        assert_cleaned_up(directory, server, started)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()


def test_a_clean_exit_stops_the_guard_too():
    from changefeed.embedded import TemporaryPostgres

    with TemporaryPostgres() as server:
        guard = server._guard  # private: the guard process has no public handle, on purpose
        assert guard is not None and guard.poll() is None
        directory = server.directory
    assert guard.returncode == 0 and not directory.exists()  # it ended on its stdin's EOF


@pytest.mark.parametrize("taken", [1, 2])
def test_a_port_taken_before_the_server_binds_it_moves_the_cluster(monkeypatch, taken):
    """Another process listens on the port picked (once, or twice in a row): the cluster
    starts on the next free one, and its URL says which."""
    squatters = []
    for _ in range(taken):
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        squatters.append(squatter)
    ports = iter([sock.getsockname()[1] for sock in squatters])
    picked = embedded.free_port
    monkeypatch.setattr(embedded, "free_port", lambda: next(ports, None) or picked())
    try:
        with embedded.TemporaryPostgres() as server:
            assert server.port not in [sock.getsockname()[1] for sock in squatters]
            assert server.log().count(embedded.ADDRESS_IN_USE) >= taken
            with psycopg.connect(server.dsn()) as conn:
                assert conn.execute("SHOW port").fetchone() == (str(server.port),)
            server.restart()  # a restart keeps the port it found
            with psycopg.connect(server.dsn()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for sock in squatters:
            sock.close()
