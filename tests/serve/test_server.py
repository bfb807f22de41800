"""``changefeed serve``'s server as a real process: port, signals, startup failures."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from clitools import assert_exit, run_cli
from testservers import free_port
from waiting import wait_until

HERE = Path(__file__).parent


def start(log: Path, port: int, *names: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "recording_service.py"), str(log), str(port), *names],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def get(port: int, path: str, timeout: float = 10) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def serving(port: int) -> bool:
    try:
        return get(port, "/healthz", timeout=1)[0] == 200
    except OSError:
        return False


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_open_long_polls_then_stops_the_services_and_exits_0(
    tmp_path: Path, signum: int
) -> None:
    log, port = tmp_path / "log", free_port()
    server = start(log, port, "a", "b")
    try:
        wait_until(lambda: serving(port), "the server to answer")
        polls = [subprocess.Popen([sys.executable, "-c", (
            "import urllib.request, sys;"
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/{name}/long-poll',"
            " timeout=30).read().decode())")], stdout=subprocess.PIPE, text=True)
            for name in "ab"]
        wait_until(lambda: sum("long-poll-waiting" in line for line in lines(log)) == 2,
                   "both requests to wait in their handlers")
        server.send_signal(signum)
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        assert all(json.loads(poll.communicate(timeout=30)[0]) == {"ended": True}
                   for poll in polls)
        assert lines(log)[:2] == ["a start", "b start"]
        assert sorted(lines(log)[2:6]) == ["a long-poll-ended", "a long-poll-waiting",
                                           "b long-poll-ended", "b long-poll-waiting"]
        assert lines(log)[6:] == ["b stop-after-stopping", "a stop-after-stopping"]
        assert "stopping" in err and "Traceback" not in err
    finally:
        server.kill()


def test_sighup_reloads_every_service_and_keeps_serving(tmp_path: Path) -> None:
    log, port = tmp_path / "log", free_port()
    server = start(log, port, "a", "b")
    try:
        wait_until(lambda: serving(port), "the server to answer")
        for round_ in range(1, 3):
            server.send_signal(signal.SIGHUP)
            wait_until(lambda n=round_: lines(log).count("b reload") == n, "the reload")
            assert serving(port)
        assert lines(log) == ["a start", "b start", "a reload", "b reload", "a reload",
                              "b reload"]
        server.terminate()
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()


def test_a_port_in_use_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        server = start(tmp_path / "log", port, "a")
        out, err = server.communicate(timeout=30)
    finally:
        taken.close()
    assert server.returncode == 2, err
    assert err.strip().splitlines() == [
        f"changefeed: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert lines(tmp_path / "log") == []


def test_a_service_failing_to_start_ends_the_server_with_its_error(tmp_path: Path) -> None:
    log = tmp_path / "log"
    server = start(log, free_port(), "a", "b:fail", "c")
    out, err = server.communicate(timeout=30)
    assert server.returncode == 2, err
    assert "changefeed: error: b refuses to start" in err
    assert "Traceback" not in err
    assert lines(log) == ["a start", "b start", "a stop"]


def test_serve_with_nothing_to_serve_is_a_usage_error() -> None:
    assert_exit(run_cli("serve"), 2, "nothing to serve")
    assert_exit(run_cli("serve", "--app", "x:y"), 2, "--app and --owner-column")
