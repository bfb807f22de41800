"""``changefeed status``: the health JSON of any service as a table, exit codes."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from clitools import assert_exit, run_cli

from changefeed.cli.status import render, rows

HEALTH = {"status": "not ready", "services": {
    "pipelines": {"alive": True, "ready": False, "pipelines": {
        "orders": {"state": "streaming", "ready": True, "delivered": 1200, "lag_seconds": 0.04,
                   "restarts": 0},
        "hook": {"state": "retrying", "ready": False, "delivered": 3, "lag_seconds": 41.25,
                 "restarts": 2, "error": "https://u:pw@h/x?token=abc answered 503"}}},
    "sync": {"alive": True, "ready": True, "state": "caught up"}}}


def test_one_row_per_pipeline_and_per_other_service_with_secrets_masked():
    table = rows(HEALTH)
    assert table == [
        ("pipelines", "orders", "streaming", "yes", "1200", "0.0 s", "0", ""),
        ("pipelines", "hook", "retrying", "no", "3", "41.2 s", "2",
         "https://***@h/x?*** answered 503"),
        ("sync", "-", "caught up", "yes", "-", "-", "-", ""),
    ]
    lines = render(table).splitlines()
    assert lines[0].split() == ["SERVICE", "PIPELINE", "STATE", "READY", "DELIVERED", "LAG",
                                "RESTARTS", "ERROR"]
    assert all(line == line.rstrip() for line in lines)
    column = lines[0].index("STATE")
    assert [line[column:].split()[0] for line in lines[1:]] == ["streaming", "retrying",
                                                                "caught"]


class _Answer(BaseHTTPRequestHandler):
    status, body = 200, b""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def answering():
    servers = []

    def start(status: int, body: bytes) -> str:
        handler = type("Handler", (_Answer,), {"status": status, "body": body})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def test_exit_codes_ready_not_ready_and_json(answering):
    ready = {"status": "ready", "services": {"pipelines": {"pipelines": {}}}}
    assert run_cli("status", "--url", answering(200, json.dumps(ready).encode())).returncode == 0
    result = run_cli("status", "--url", answering(503, json.dumps(HEALTH).encode()))
    assert result.returncode == 1 and result.stdout.splitlines()[-1] == "not ready"
    shown = run_cli("status", "--json", "--url", answering(503, json.dumps(HEALTH).encode()))
    assert json.loads(shown.stdout)["services"]["sync"]["state"] == "caught up"


def test_a_server_that_is_not_there_or_not_changefeed_is_one_line_exit_3(answering):
    from testservers import refused_port

    port = refused_port()
    assert_exit(run_cli("status", "--url", f"http://127.0.0.1:{port}"), 3,
                f"cannot reach http://127.0.0.1:{port}/readyz")
    assert_exit(run_cli("status", "--url", answering(200, b"<html>hello</html>")), 3,
                "did not answer with changefeed's health")
