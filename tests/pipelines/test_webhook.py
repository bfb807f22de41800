"""The webhook sink against a real HTTP server on 127.0.0.1 that fails, then recovers."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading

import pytest
from testservers import Receiver

from changefeed import PipelineError, Retry
from changefeed.pipelines import Pipeline, to_delta
from changefeed.pipelines.sinks.http import WebhookSink
from changefeed.testing import MemoryFeed, insert

SECRET = "s3cret"
FAST = Retry(initial=0.01, maximum=0.05, attempts=5)


def feed_of(n: int) -> MemoryFeed:
    return MemoryFeed("tasks", changes=[insert("tasks", {"id": i}) for i in range(1, n + 1)])


@pytest.mark.parametrize("receiver", [(3,)], indirect=True)
def test_webhook_retries_5xx_with_the_same_key_and_loses_nothing(receiver):
    feed = feed_of(10)
    sink = WebhookSink(receiver.url, secret=SECRET, retry=FAST)
    Pipeline(feed, [to_delta()], sink=sink, batch_size=4, batch_seconds=60).run()

    assert [status for _, _, status in receiver.requests[:4]] == [503, 503, 503, 200]
    first_key = receiver.requests[0][0]["idempotency-key"]
    assert {h["idempotency-key"] for h, _, _ in receiver.requests[:4]} == {first_key}
    delivered = [d["data"]["id"] for _, body in receiver.accepted() for d in json.loads(body)]
    assert delivered == list(range(1, 11))
    keys = [h["idempotency-key"] for h, _ in receiver.accepted()]
    assert len(set(keys)) == 3  # batches 1..4, 5..8, 9..10
    for headers, body in receiver.accepted():
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-changefeed-signature"], expected)
        assert headers["content-type"] == "application/json"
    assert feed.checkpoint.positions == {"tasks": 10}


@pytest.mark.parametrize("receiver", [(100,)], indirect=True)
def test_webhook_gives_up_after_its_attempts_and_acknowledges_nothing(receiver):
    feed = feed_of(3)
    with pytest.raises(PipelineError, match=r"failed 6 times; last: HTTP 503"):
        Pipeline(feed, [], sink=WebhookSink(receiver.url, retry=FAST)).run()
    assert len(receiver.requests) == 6
    assert feed.checkpoint.positions == {}


@pytest.mark.parametrize("receiver", [(1, 400)], indirect=True)
def test_webhook_does_not_retry_a_4xx(receiver):
    feed = feed_of(1)
    with pytest.raises(PipelineError, match="answered 400"):
        Pipeline(feed, [], sink=WebhookSink(receiver.url, retry=FAST)).run()
    assert len(receiver.requests) == 1


def test_webhook_retries_while_the_server_is_down():
    from testservers import reserve_port

    reserved = reserve_port()  # bound, not listening: refused, and no one else can take it
    port = reserved.getsockname()[1]
    started: list[Receiver] = []

    def serve() -> None:
        receiver = Receiver(sock=reserved)
        started.append(receiver)
        receiver.serve_forever(0.05)

    # Nothing listens yet: the first attempts get "connection refused"; the server comes later.
    timer = threading.Timer(0.3, lambda: threading.Thread(target=serve, daemon=True).start())
    timer.start()
    feed = feed_of(2)
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook",
                       retry=Retry(initial=0.05, maximum=0.2, attempts=30))
    Pipeline(feed, [to_delta()], sink=sink).run()
    [receiver] = started
    try:
        [(_, body, status)] = receiver.requests
        assert status == 200 and [d["data"]["id"] for d in json.loads(body)] == [1, 2]
        assert feed.checkpoint.positions == {"tasks": 2}
    finally:
        receiver.shutdown()
        receiver.server_close()
