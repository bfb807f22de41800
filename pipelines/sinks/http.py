"""HTTP sinks: a generic webhook and Snorky's backend protocol (httpx, synchronous).

Both POST one request per batch and count the batch as delivered only on a 2xx answer (and, for
Snorky, an answer of type ``response``). A retried request is the same request: same body, same
``Idempotency-Key``, so a receiver that saw the first attempt can drop the copy.

What an answer or a failure means (`_HttpSink.classify`):

* retried with exponential backoff and jitter (`changefeed.Retry`): a 5xx answer; 408, 409, 425
  and 429 (waiting at least what ``Retry-After`` asks); a connection refused or reset; a name the
  resolver could not look up for now; no answer within the read timeout;
* a 413 (the body is too large): the webhook splits the batch in halves and sends each, down to
  one change; a change the receiver refuses even alone is rejected (`ItemsRejected`): it goes
  to the dead letters, or the run fails;
* failed at once, since sending again cannot change them: any other 4xx; and, as
  `SinkUnavailable` (never dead-lettered: every change would meet them), a TLS handshake that
  fails (``https://`` to a plain-HTTP port, a certificate that does not verify), a host name that
  does not exist, and the answers that say the endpoint itself is wrong (401, 403, 404, 405,
  407, 410, 426).

Timeouts are settings: ``timeout`` (each phase), ``connect_timeout`` and ``read_timeout`` (an
endpoint that takes long to answer). The key is derived from the positions of the batch's first
and last changes, so it is stable for one batch; a batch made after a restart may cover
different positions and then gets another key: receivers that must never apply a change twice
should also compare positions.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import logging
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any, TypeVar

import httpx

from changefeed.bounds import seconds_problem
from changefeed.change import Change, Truncate
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.formats.codec import dumps
from changefeed.formats.delta import delta_of
from changefeed.pipelines.sinks import (
    Batch,
    ItemsRejected,
    RemoteSink,
    Retryable,
    SinkUnavailable,
    jsonable,
)
from changefeed.redact import redact
from changefeed.retry import Retry

log = logging.getLogger("changefeed.pipelines")
RETRY_STATUS = frozenset({408, 409, 425, 429})
"""4xx answers that may change on a later attempt (timeout, conflict, too early, too many)."""
ENDPOINT_STATUS = frozenset({401, 403, 404, 405, 407, 410, 426})
"""4xx answers about the endpoint, not the batch: every batch would get them."""
TOO_LARGE = 413
RETRY_AFTER_MAX = 600.0
"""The longest ``Retry-After`` waited for (a longer one is cut to this)."""


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


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header asks to wait (seconds, or an HTTP date), at most
    `RETRY_AFTER_MAX`; 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


_Cause = TypeVar("_Cause", bound=BaseException)


def _cause(exc: BaseException, kind: type[_Cause]) -> _Cause | None:
    """The first exception of type ``kind`` in ``exc``'s chain of causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _check_timeout(name: str, value: float | None) -> None:
    if value is not None:
        problem = seconds_problem(value)
        if problem is not None:
            raise ConfigurationError(f"{name} {problem}, not {value!r}")


class _HttpSink(RemoteSink):
    """Shared by the HTTP sinks: a lazily opened client, one POST retried as a whole, what each
    failure means (see the module's notes)."""

    retry_read_timeout = True
    """Whether a request that got no answer in time is sent again."""

    def __init__(self, url: str, timeout: float, retry: Retry | None, *,
                 connect_timeout: float | None = None,
                 read_timeout: float | None = None) -> None:
        self.shown_url = redact(url)
        """The URL as messages show it: without credentials or query string."""
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"not an http(s) URL: {self.shown_url!r}")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad URL {self.shown_url!r}: {exc}") from None
        if not parsed.host:
            raise ConfigurationError(f"bad URL {self.shown_url!r}: no host")
        self.url = url
        _check_timeout("timeout", timeout)
        _check_timeout("connect_timeout", connect_timeout)
        _check_timeout("read_timeout", read_timeout)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retry = retry if retry is not None else self.default_retry
        self._client: httpx.Client | None = None
        self._interrupted = threading.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.shown_url}>"

    @property
    def read_seconds(self) -> float:
        """How long an answer may take."""
        return self.read_timeout if self.read_timeout is not None else self.timeout

    def _open_client(self) -> httpx.Client:
        return httpx.Client(timeout=httpx.Timeout(
            self.timeout, connect=self.connect_timeout or self.timeout,
            read=self.read_seconds))

    def post(self, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """POST ``body`` until an answer that is not retried (returned if 2xx); raise
        `PipelineError` (or `SinkUnavailable`) if none comes, `Retryable` never."""
        return self.retrying(lambda: self._post_once(body, dict(headers)), self.shown_url)

    def _post_once(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """One attempt: the 2xx or 413 answer, or what `classify` makes of the failure."""
        try:
            response = self.client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise self.transport_failure(exc) from exc
        status = response.status_code
        if status < 300 or status == TOO_LARGE:
            return response
        raise self.refused(response)

    def transport_failure(self, exc: httpx.TransportError) -> Exception:
        """What a failure to get an answer means: retried unless it cannot heal."""
        problem = redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        tls = _cause(exc, ssl.SSLError)
        if tls is not None:
            hint = ""
            if "WRONG_VERSION_NUMBER" in str(tls) or "record layer" in str(tls):
                hint = " (is it a plain-HTTP port? use http://)"
            elif isinstance(tls, ssl.SSLCertVerificationError):
                hint = " (a certificate the system does not trust)"
            return SinkUnavailable(f"{self.shown_url}: TLS handshake failed: {tls}{hint}")
        lookup = _cause(exc, socket.gaierror)
        if lookup is not None and lookup.errno in _NO_SUCH_NAME:
            return SinkUnavailable(f"{self.shown_url}: no such host: {lookup.strerror}")
        if isinstance(exc, httpx.ReadTimeout):
            if not self.retry_read_timeout:
                return self.read_timed_out()
            return Retryable(f"no answer within {self.read_seconds:g} s (raise the read"
                             " timeout if the endpoint takes longer: ?read_timeout=SECONDS)")
        return Retryable(problem)

    def refused(self, response: httpx.Response) -> Exception:
        """What a non-2xx answer means: retried (5xx, `RETRY_STATUS`), the endpoint wrong
        (`ENDPOINT_STATUS`), or this batch refused."""
        status = response.status_code
        said = f"{self.shown_url} answered {status} {response.reason_phrase}"
        if status >= 500 or status in RETRY_STATUS:
            return Retryable(redact(f"HTTP {status} {response.reason_phrase}"),
                             after=retry_after(response.headers.get("Retry-After")))
        if status in ENDPOINT_STATUS:
            return SinkUnavailable(f"{said}: check the URL and its credentials")
        return PipelineError(f"{said}: {response.text[:200]}")

    def read_timed_out(self) -> PipelineError:
        return PipelineError(f"{self.shown_url} did not answer within {self.read_seconds:g} s")


_NO_SUCH_NAME = frozenset(
    code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None)
"""The resolver's answer for a name that does not exist (not: could not ask, EAI_AGAIN)."""


class WebhookSink(_HttpSink):
    """POST each batch as a JSON array to ``url``.

    Headers: ``Content-Type: application/json``, ``Idempotency-Key`` (see `idempotency_key`),
    and with ``secret`` an HMAC-SHA256 signature of the body in ``signature_header``
    (``sha256=<hex>``, as GitHub-style receivers expect). Changes are sent as ``to_dict()``;
    put ``to_delta()`` before the sink for Snorky deltas. A batch answered 413 is split (see
    the module's notes).

    Args:
        url: the endpoint.
        secret: key of the HMAC signature; None sends no signature.
        headers: extra headers (e.g. ``Authorization``).
        timeout: seconds for each phase of a request (connecting, sending, each read).
        connect_timeout: seconds for connecting (default: ``timeout``).
        read_timeout: seconds the answer may take (default: ``timeout``); an endpoint that
            works longer on a batch needs more, or the batch is sent again and again.
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
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        retry: Retry | None = None,
    ) -> None:
        super().__init__(url, timeout, retry, connect_timeout=connect_timeout,
                         read_timeout=read_timeout)
        self.secret = secret
        self.signature_header = signature_header
        self.headers = dict(headers or {})
        self.name = f"webhook({self.shown_url})"

    def write_batch(self, batch: Batch) -> None:
        rejected: list[int] = []
        self._deliver(batch, 0, rejected)
        if rejected:
            shown = ", ".join(repr(batch.positions[i]) for i in rejected[:3])
            more = f" and {len(rejected) - 3} more" if len(rejected) > 3 else ""
            raise ItemsRejected(
                f"{self.shown_url} answered 413 Payload Too Large to the change at {shown}{more}"
                " even alone", rejected)

    def _deliver(self, batch: Batch, offset: int, rejected: list[int]) -> None:
        """POST ``batch`` (items ``offset``... of the batch given to `write_batch`); on a 413
        split it in halves, down to single items, whose indexes go to ``rejected``."""
        body = dumps([jsonable(item) for item in batch.items])
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key(batch, body),
        }
        if self.secret is not None:
            headers[self.signature_header] = sign(self.secret, body)
        response = self.post(body, headers)
        if response.status_code != TOO_LARGE:
            return
        if len(batch) == 1:
            rejected.append(offset)
            return
        half = len(batch) // 2
        for start, end in ((0, half), (half, len(batch))):
            self._deliver(Batch(batch.items[start:end], batch.positions[start:end]),
                          offset + start, rejected)


class SnorkySink(_HttpSink):
    """Publish deltas to a Snorky DataSync backend service.

    Each batch is one ``publishDeltas`` call: ``POST`` to the backend URL (e.g.
    ``http://snorky:8001/backend``) with ``X-Backend-Key``, body
    ``{"service": S, "message": {"command": "publishDeltas", "params": {"deltas": [...]}}}``.
    Snorky answers ``{"message": {"type": "response", ...}}``, or ``"type": "error"`` (raised as
    `PipelineError`, not retried). A message for a service name Snorky does not know is never
    answered, so a read timeout says to check the name.

    Items may be deltas (dicts from ``to_delta()``) or changes, turned into deltas with ``model``.

    Snorky has no delta for a truncate (its backend refuses unknown types, failing the whole
    batch): a `Truncate` (or a truncate delta) is left out with a warning naming the table, and
    counts as delivered. Snorky's subscribers keep that table's rows: re-subscribe them.

    ``timeout``, ``connect_timeout`` and ``read_timeout`` as for `WebhookSink`.
    """

    accepts = "deltas"
    retry_read_timeout = False  # the likely cause is a wrong service name: say so at once

    def __init__(
        self,
        url: str,
        *,
        service: str = "datasync_backend",
        key: str,
        model: str | Mapping[str, str] | None = None,
        timeout: float = 5.0,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        retry: Retry | None = None,
    ) -> None:
        super().__init__(url, timeout, retry, connect_timeout=connect_timeout,
                         read_timeout=read_timeout)
        self.service = service
        self.key = key
        self.model = model
        self.name = f"snorky({self.shown_url}, service={service})"

    def _delta(self, item: Any) -> Any:
        return delta_of(item, self.model) if isinstance(item, (Change, Truncate)) else item

    def write_batch(self, batch: Batch) -> None:
        deltas = []
        for item, position in zip(batch.items, batch.positions, strict=True):
            delta = self._delta(item)
            if isinstance(delta, dict) and delta.get("type") == "truncate":
                log.warning(
                    "%s: TRUNCATE of %s at position %r is not sent: Snorky has no delta for it,"
                    " so its subscribers keep the rows of model %s", self.name,
                    getattr(item, "table", delta.get("model")), position, delta.get("model"))
                continue
            deltas.append(delta)
        if not deltas:
            return
        message = {
            "service": self.service,
            "message": {"command": "publishDeltas", "params": {"deltas": deltas}},
        }
        headers = {"Content-Type": "application/json", "X-Backend-Key": self.key}
        response = self.post(dumps(message), headers)
        if response.status_code == TOO_LARGE:
            raise PipelineError(f"Snorky at {self.shown_url} answered 413 Payload Too Large:"
                                " make the batches smaller (batch(size=...))")
        try:
            answer = response.json()["message"]
            kind = answer["type"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PipelineError(f"Snorky gave an unexpected answer: {response.text[:200]}") from exc
        if kind == "error":
            raise PipelineError(f"Snorky refused the deltas: {answer.get('message')}")
        if kind != "response":
            raise PipelineError(f"Snorky gave an unexpected answer: {response.text[:200]}")

    def read_timed_out(self) -> PipelineError:
        return PipelineError(
            f"Snorky at {self.shown_url} did not answer within {self.read_seconds:g} s; it never"
            f" answers a message for a service it does not know: is the service name"
            f" {self.service!r} right?"
        )

