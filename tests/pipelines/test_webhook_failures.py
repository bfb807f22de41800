"""What each way a webhook can fail means, against real HTTP and TLS servers on 127.0.0.1.

* an endpoint slower than the read timeout: the timeout is a setting (``read_timeout``, also as
  ``?read_timeout=`` in a ``--sink`` URL), and a batch is sent once when it is long enough;
* 413: the batch is split down to single changes; a change refused even alone is dead-lettered
  (or fails the run), the others are delivered once, in order;
* what cannot heal fails at once, without retries and never into the dead letters: ``https://``
  to a plain-HTTP port, a certificate that does not verify, a host that does not exist, 401,
  403, 404; a 4xx about the batch (400, 422) fails it;
* what can heal is retried: 5xx, a refused connection, 408, 409, 425, and 429 after the
  ``Retry-After`` it asks.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from clitools import assert_exit, run_cli
from testservers import Receiver, reserve_port

from changefeed import PipelineError, Retry
from changefeed.pipelines import Pipeline, batch
from changefeed.pipelines.sinks import SinkUnavailable
from changefeed.pipelines.sinks.http import SnorkySink, WebhookSink, retry_after
from changefeed.testing import ListSink, MemoryFeed, insert

FAST = Retry(initial=0.01, maximum=0.05, attempts=4)

Answer = Callable[[list, int], "tuple[int, dict[str, str]]"]


class Scripted(ThreadingHTTPServer):
    """An HTTP server that answers each POST with ``answer(items, number)`` (the JSON array it
    got, and how many requests came before): a status and headers. Records every request."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.answer = answer
        self.requests: list[tuple[float, list, int, str]] = []
        self.lock = threading.Lock()
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/hook"

    def delivered(self) -> list:
        return [item for _, items, status, _ in self.requests if status < 300 for item in items]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: Scripted

    def do_POST(self) -> None:  # noqa: N802
        items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            status, headers = self.server.answer(items, len(self.server.requests))
            self.server.requests.append((time.monotonic(), items, status, self.path))
        self.send_response(status)
        for name, value in {**headers, "Content-Length": "0"}.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted():
    servers: list[Scripted] = []

    def start(answer: Answer, tls: ssl.SSLContext | None = None) -> Scripted:
        servers.append(Scripted(answer, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def feed_of(n: int, title: str = "t") -> MemoryFeed:
    return MemoryFeed("tasks", changes=[insert("tasks", {"id": i, "title": title})
                                        for i in range(1, n + 1)])


def ids(items: list) -> list[int]:
    return [item["new"]["id"] for item in items]


# -- timeouts ----------------------------------------------------------------------------------


def test_an_endpoint_slower_than_the_read_timeout_is_retried_then_fails_saying_so():
    receiver = Receiver(delay=1.0).start()
    try:
        feed = feed_of(3)
        sink = WebhookSink(receiver.url, read_timeout=0.3, retry=Retry(0.01, 0.05, attempts=2))
        with pytest.raises(PipelineError, match=r"no answer within 0.3 s \(raise the read"
                                                r" timeout"):
            Pipeline(feed, [batch(10, 60)], sink=sink).run()
        assert feed.checkpoint.positions == {}
    finally:
        receiver.stop()


@pytest.mark.parametrize("settings", [{"read_timeout": 5.0}, {"timeout": 5.0}])
def test_a_read_timeout_long_enough_sends_each_batch_once(settings):
    receiver = Receiver(delay=1.0).start()  # longer than a 0.3 s default would allow
    try:
        feed = feed_of(6)
        sink = WebhookSink(receiver.url, connect_timeout=0.3, retry=FAST, **settings)
        Pipeline(feed, [batch(3, 60)], sink=sink).run()
        assert len(receiver.requests) == 2  # each batch once: no copies
        assert feed.checkpoint.positions == {"tasks": 6}
    finally:
        receiver.stop()


@pytest.mark.postgres
def test_read_timeout_as_a_sink_url_parameter(pg_dsn, pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY)")
    receiver = Receiver(delay=1.5).start()
    try:
        url = receiver.url + "?tenant=a&read_timeout=10"
        result = run_cli("run", "tasks", "--url", pg_dsn, "--sink", url, "--until-idle", "0.3")
        assert result.returncode == 0, result.stderr
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO tasks SELECT generate_series(1, 5)")
        result = run_cli("run", "tasks", "--url", pg_dsn, "--sink", url, "--until-idle", "2")
        assert result.returncode == 0, result.stderr
        assert "retrying" not in result.stderr
        assert len(receiver.requests) == 1
        delivered = [d["data"]["id"] for _, body in receiver.accepted() for d in json.loads(body)]
        assert delivered == [1, 2, 3, 4, 5]
    finally:
        receiver.stop()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "soon"])
@pytest.mark.parametrize("name", ["timeout", "connect_timeout", "read_timeout"])
def test_a_timeout_that_means_nothing_is_refused(name, value):
    result = run_cli("run", "t", "--url", "postgresql://127.0.0.1:1/x", "--sink",
                     f"http://127.0.0.1:1/hook?{name}={value}", timeout=30)
    assert_exit(result, 2, f"{name}='{value}'")
    with pytest.raises(Exception, match=name):
        WebhookSink("http://127.0.0.1:1/", **{name: float("nan")})


# -- 413 ---------------------------------------------------------------------------------------


def at_most(count: int, too_big: int | None = None) -> Answer:
    """413 for more than ``count`` changes, or for any request holding change ``too_big``."""
    def answer(items: list, number: int) -> tuple[int, dict[str, str]]:
        if len(items) > count or too_big in ids(items):
            return 413, {}
        return 200, {}
    return answer


@pytest.mark.parametrize("limit", [1, 7, 10, 99])
def test_a_413_splits_the_batch_and_delivers_everything_once_in_order(scripted, limit):
    server = scripted(at_most(limit))
    feed = feed_of(100)
    Pipeline(feed, [batch(100, 60)], sink=WebhookSink(server.url, retry=FAST)).run()
    assert ids(server.delivered()) == list(range(1, 101))
    assert all(len(items) <= limit for _, items, status, _ in server.requests if status == 200)
    assert feed.checkpoint.positions == {"tasks": 100}


@pytest.mark.parametrize("too_big", [1, 37, 100])
def test_a_change_refused_even_alone_goes_to_the_dead_letters(scripted, too_big):
    server = scripted(at_most(16, too_big=too_big))
    feed = feed_of(100)
    letters = ListSink()
    Pipeline(feed, [batch(100, 60)], sink=WebhookSink(server.url, retry=FAST),
             dead_letter=letters).run()
    assert ids(server.delivered()) == [i for i in range(1, 101) if i != too_big]
    assert [letter["change"]["new"]["id"] for letter in letters.items] == [too_big]
    assert "413" in letters.items[0]["error"]
    assert feed.checkpoint.positions == {"tasks": 100}


def test_a_change_refused_even_alone_fails_the_run_without_dead_letters(scripted):
    server = scripted(at_most(16, too_big=37))
    feed = feed_of(100)
    with pytest.raises(PipelineError, match=r"413 Payload Too Large to the change at 37"
                                            r" even alone"):
        Pipeline(feed, [batch(100, 60)], sink=WebhookSink(server.url, retry=FAST)).run()
    assert feed.checkpoint.positions == {}


def test_snorky_says_what_to_do_on_a_413(scripted):
    server = scripted(lambda items, number: (413, {}))
    sink = SnorkySink(server.url, key="k", retry=FAST)
    with pytest.raises(PipelineError, match=r"413 Payload Too Large: make the batches smaller"):
        Pipeline(feed_of(2), [], sink=sink).run()


# -- what cannot heal fails at once ------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> ssl.SSLContext:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def fails_at_once(url: str, fragment: str, *, dead_letter: bool = True) -> None:
    """A pipeline to ``url`` fails with one `SinkUnavailable` attempt: no retry, nothing
    acknowledged, nothing dead-lettered."""
    feed = feed_of(5)
    letters = ListSink()
    sink = WebhookSink(url, retry=Retry(initial=5.0, maximum=5.0, attempts=3))
    with pytest.raises(PipelineError, match=fragment) as info:
        Pipeline(feed, [], sink=sink, dead_letter=letters if dead_letter else None).run()
    assert isinstance(info.value.__cause__, SinkUnavailable), info.value.__cause__
    assert letters.items == [] and feed.checkpoint.positions == {}


def test_https_to_a_plain_http_port_fails_at_once(scripted):
    server = scripted(lambda items, number: (200, {}))
    fails_at_once(server.url.replace("http://", "https://"),
                  r"TLS handshake failed: .*is it a plain-HTTP port\? use http://")
    assert server.requests == []


def test_a_certificate_that_does_not_verify_fails_at_once(scripted, self_signed):
    server = scripted(lambda items, number: (200, {}), tls=self_signed)
    fails_at_once(server.url, r"TLS handshake failed: .*certificate verify failed")
    assert server.requests == []


def test_a_host_that_does_not_exist_fails_at_once():
    fails_at_once("http://no-such-host.invalid/hook", "no such host")


@pytest.mark.parametrize("status", [401, 403, 404, 405, 410])
def test_an_answer_about_the_endpoint_fails_at_once_and_is_not_dead_lettered(scripted, status):
    server = scripted(lambda items, number: (status, {}))
    fails_at_once(server.url, f"answered {status}")
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [400, 422])
def test_a_4xx_about_the_batch_fails_it_into_the_dead_letters(scripted, status):
    server = scripted(lambda items, number: (status, {}))
    feed = feed_of(3)
    letters = ListSink()
    Pipeline(feed, [batch(3, 60)], sink=WebhookSink(server.url, retry=FAST),
             dead_letter=letters).run()
    assert len(server.requests) == 1 and len(letters.items) == 3
    assert feed.checkpoint.positions == {"tasks": 3}


# -- what can heal is retried ------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409, 425, 429])
def test_answers_that_may_change_are_retried(scripted, status):
    server = scripted(lambda items, number: (status, {}) if number < 2 else (200, {}))
    feed = feed_of(3)
    Pipeline(feed, [batch(3, 60)], sink=WebhookSink(server.url, retry=FAST)).run()
    assert [entry[2] for entry in server.requests] == [status, status, 200]
    assert feed.checkpoint.positions == {"tasks": 3}


@pytest.mark.parametrize("header", ["1", "date"])
def test_a_429_waits_at_least_its_retry_after(scripted, header):
    def answer(items: list, number: int) -> tuple[int, dict[str, str]]:
        if number:
            return 200, {}
        when = "1" if header == "1" else time.strftime(  # two seconds on: at least one
            "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 2))
        return 429, {"Retry-After": when}
    server = scripted(answer)
    Pipeline(feed_of(2), [batch(2, 60)], sink=WebhookSink(server.url, retry=FAST)).run()
    (first, *_), (second, *_) = server.requests
    assert second - first >= 0.9  # FAST alone would wait 0.01 s


def test_retry_after_forms():
    assert retry_after("120") == 120.0 and retry_after(None) == 0.0 and retry_after("x") == 0.0
    assert retry_after("99999") == 600.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_a_refused_connection_is_retried_until_the_endpoint_comes():
    reserved = reserve_port()  # bound, not listening: refused, and no one else can take it
    port = reserved.getsockname()[1]
    refused = threading.Event()

    class Noting(Retry):
        def delay(self, failures: int) -> float:
            refused.set()  # a failure is being retried
            return super().delay(failures)

    feed = feed_of(2)
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook",
                       retry=Noting(initial=0.1, maximum=0.3, attempts=50))
    receivers: list[Receiver] = []

    def come_up() -> None:
        refused.wait(30)
        receivers.append(Receiver(sock=reserved).start())

    thread = threading.Thread(target=come_up, daemon=True)
    thread.start()
    try:
        Pipeline(feed, [], sink=sink).run()
    finally:
        thread.join(10)
        for receiver in receivers:
            receiver.stop()
    assert refused.is_set() and len(receivers[0].requests) == 1
    assert feed.checkpoint.positions == {"tasks": 2}
