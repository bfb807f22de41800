"""HTTP sinks: a generic webhook and Snorky's backend protocol (httpx, synchronous).

Both POST one request per batch and count the batch as delivered only on a 2xx answer (and, for
Snorky, an answer of type ``response``). Retries: a 5xx answer, 408/429, or a connection error
is retried with exponential backoff and jitter (`changefeed.Retry`); other answers fail at once,
since sending the same body again cannot change them. A retried request is the same request:
same body, same ``Idempotency-Key``, so a receiver that saw the first attempt can drop the copy.

The key is derived from the positions of the batch's first and last changes, so it is stable
for one batch; a batch made after a restart may cover different positions and then gets another
key: receivers that must never apply a change twice should also compare positions.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping
from typing import Any

import httpx

from changefeed.change import Change
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.formats.codec import dumps
from changefeed.formats.delta import to_delta
from changefeed.pipelines.sinks import Batch, RemoteSink, Retryable, jsonable
from changefeed.redact import redact
from changefeed.retry import Retry

_RETRY_STATUS = frozenset({408, 429})


def idempotency_key(batch: Batch, body: bytes) -> str:
    """A stable key for ``batch``: from its first..last positions, else from its body."""
    if batch.first is not None and batch.last is not None:
        seed = dumps([batch.first, batch.last])
    else:
        seed = body
    return hashlib.sha256(seed).hexdigest()[:32]


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature header value: ``sha256=`` + HMAC-SHA256 of ``body`` with ``secret``, hex."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class _HttpSink(RemoteSink):
    """Shared by the HTTP sinks: a lazily opened client, one POST retried as a whole."""

    retry_read_timeout = True
    """Whether a request that got no answer in time is sent again."""

    def __init__(self, url: str, timeout: float, retry: Retry | None) -> None:
        self.shown_url = redact(url)
        """The URL as messages show it: without credentials or query string."""
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"not an http(s) URL: {self.shown_url!r}")
        self.url = url
        self.timeout = timeout
        self.retry = retry if retry is not None else self.default_retry
        self._client: httpx.Client | None = None
        self._interrupted = threading.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.shown_url}>"

    def _open_client(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout)

    def post(self, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """POST ``body`` until a non-retryable answer; raise `PipelineError` if none comes."""
        return self.retrying(lambda: self._post_once(body, dict(headers)), self.shown_url)

    def _post_once(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """One attempt: the 2xx answer, or `Retryable` (5xx, 408, 429, a transport error)."""
        try:
            response = self.client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ReadTimeout) and not self.retry_read_timeout:
                raise self.read_timeout() from exc
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise Retryable(redact(problem)) from exc
        status = response.status_code
        if status < 300:
            return response
        if status < 500 and status not in _RETRY_STATUS:
            raise PipelineError(
                f"{self.shown_url} answered {status} {response.reason_phrase}:"
                f" {response.text[:200]}"
            )
        raise Retryable(redact(f"HTTP {status} {response.reason_phrase}"))

    def read_timeout(self) -> PipelineError:
        return PipelineError(f"{self.shown_url} did not answer within {self.timeout} s")



class WebhookSink(_HttpSink):
    """POST each batch as a JSON array to ``url``.

    Headers: ``Content-Type: application/json``, ``Idempotency-Key`` (see `idempotency_key`),
    and with ``secret`` an HMAC-SHA256 signature of the body in ``signature_header``
    (``sha256=<hex>``, as GitHub-style receivers expect). Changes are sent as ``to_dict()``;
    put ``to_delta()`` before the sink for Snorky deltas.

    Args:
        url: the endpoint.
        secret: key of the HMAC signature; None sends no signature.
        headers: extra headers (e.g. ``Authorization``).
        timeout: seconds for connecting and for each read.
        retry: backoff between attempts and how many (default: 8 attempts, 0.5 s doubling to 30 s).
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | bytes | None = None,
        signature_header: str = "X-Changefeed-Signature",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        retry: Retry | None = None,
    ) -> None:
        super().__init__(url, timeout, retry)
        self.secret = secret
        self.signature_header = signature_header
        self.headers = dict(headers or {})
        self.name = f"webhook({self.shown_url})"

    def write_batch(self, batch: Batch) -> None:
        body = dumps([jsonable(item) for item in batch.items])
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key(batch, body),
        }
        if self.secret is not None:
            headers[self.signature_header] = sign(self.secret, body)
        self.post(body, headers)


class SnorkySink(_HttpSink):
    """Publish deltas to a Snorky DataSync backend service.

    Each batch is one ``publishDeltas`` call: ``POST`` to the backend URL (e.g.
    ``http://snorky:8001/backend``) with ``X-Backend-Key``, body
    ``{"service": S, "message": {"command": "publishDeltas", "params": {"deltas": [...]}}}``.
    Snorky answers ``{"message": {"type": "response", ...}}``, or ``"type": "error"`` (raised as
    `PipelineError`, not retried). A message for a service name Snorky does not know is never
    answered, so a read timeout says to check the name.

    Items may be deltas (dicts from ``to_delta()``) or changes, turned into deltas with ``model``.
    """

    accepts = "deltas"
    retry_read_timeout = False  # the likely cause is a wrong service name: say so at once

    def __init__(
        self,
        url: str,
        *,
        service: str = "datasync_backend",
        key: str,
        model: str | None = None,
        timeout: float = 5.0,
        retry: Retry | None = None,
    ) -> None:
        super().__init__(url, timeout, retry)
        self.service = service
        self.key = key
        self.model = model
        self.name = f"snorky({self.shown_url}, service={service})"

    def _delta(self, item: Any) -> Any:
        return to_delta(item, self.model) if isinstance(item, Change) else item

    def write_batch(self, batch: Batch) -> None:
        message = {
            "service": self.service,
            "message": {
                "command": "publishDeltas",
                "params": {"deltas": [self._delta(item) for item in batch.items]},
            },
        }
        headers = {"Content-Type": "application/json", "X-Backend-Key": self.key}
        response = self.post(dumps(message), headers)
        try:
            answer = response.json()["message"]
            kind = answer["type"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PipelineError(f"Snorky gave an unexpected answer: {response.text[:200]}") from exc
        if kind == "error":
            raise PipelineError(f"Snorky refused the deltas: {answer.get('message')}")
        if kind != "response":
            raise PipelineError(f"Snorky gave an unexpected answer: {response.text[:200]}")

    def read_timeout(self) -> PipelineError:
        return PipelineError(
            f"Snorky at {self.shown_url} did not answer within {self.timeout} s; it never answers a"
            f" message for a service it does not know: is the service name {self.service!r} right?"
        )
