"""`sink_from_spec`: a sink from one string, as `changefeed.get_changefeed` makes a feed from a URL.

The CLI's ``--sink SPEC`` and ``--dead-letter SPEC`` take these forms:

=============================================================  ==================================
``-``                                                          JSON lines on stdout (default)
a file path                                                    JSON lines appended to the file
``http://...``, ``https://...``                                webhook: JSON array per batch;
                                                               ``$CHANGEFEED_WEBHOOK_SECRET``
                                                               signs it (HMAC-SHA256);
                                                               ``?timeout=``,
                                                               ``connect_timeout=``,
                                                               ``read_timeout=`` (seconds)
``snorky+http://host:port/backend?service=NAME&key=KEY``        Snorky's publishDeltas
                                                               (``snorky+https`` too)
``redis://host:port/0?stream=NAME[&maxlen=N]``                 Redis stream (``rediss://`` too)
``kafka://[USER:PASSWORD@]host:port[,host:port]?topic={table}``  Kafka topic per table (keyed by
                                                               primary key; ``kafkas://`` for
                                                               TLS)
=============================================================  ==================================

Every URL form is one `SinkKind` in `SINK_KINDS`: its schemes, the package and pip extra it
needs (imported only when such a sink is asked for), and the function that reads the URL.
Query parameters a sink consumes are taken out of the URL it is given; the others stay.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from changefeed.bounds import parse_count, parse_seconds
from changefeed.errors import ConfigurationError
from changefeed.formats.registry import format_named
from changefeed.pipelines.sinks import JsonLinesSink, Sink
from changefeed.preflight import check_writable
from changefeed.redact import redact
from changefeed.registry import url_scheme

WEBHOOK_SECRET_ENV = "CHANGEFEED_WEBHOOK_SECRET"


@dataclass(frozen=True)
class SinkOptions:
    """What the CLI's other options tell a sink made from a spec."""

    fmt: str = "delta"
    """``--format`` (`changefeed.formats.registry`): the sinks that format their items themselves
    (Kafka) need it."""
    model: str | Mapping[str, str] | None = None
    """``--model``: the model name of deltas."""


@dataclass(frozen=True)
class SinkKind:
    """A kind of sink a URL names: ``make(url, scheme, options)`` builds it."""

    title: str
    """Its name in messages (``Kafka``)."""
    schemes: tuple[str, ...]
    """URL schemes, lower case; the first ones are shown in messages."""
    shown: str
    """How messages list it (``http(s)://``)."""
    package: str
    """The package it needs, imported before ``make`` to say which extra installs it."""
    extra: str
    """The pip extra that installs ``package`` (``changefeed[kafka]``)."""
    make: Callable[[str, str, SinkOptions], Sink]


def sink_from_spec(
    spec: str, *, model: str | Mapping[str, str] | None = None, fmt: str = "delta",
    option: str = "--sink",
) -> Sink:
    """The sink a ``--sink`` value names (see the module docstring for the forms).

    A file is checked writable now, so a run fails before it reads a change; ``option`` names
    the option in that message. Raises `ConfigurationError` for a spec it cannot serve.
    """
    format_named(fmt)  # an unknown one is refused before any sink is made
    if spec == "-":
        return JsonLinesSink("-")
    scheme = url_scheme(spec)
    if not scheme:
        check_writable(spec, f"{option} file")
        return JsonLinesSink(spec)
    kind = next((kind for kind in SINK_KINDS if scheme in kind.schemes), None)
    if kind is None:
        forms = ["-", "a file path", *(kind.shown for kind in SINK_KINDS)]
        raise ConfigurationError(
            f"unsupported sink {redact(spec)!r}: use {', '.join(forms[:-1])} or {forms[-1]}"
        )
    try:
        importlib.import_module(kind.package)
    except ImportError as exc:
        raise ConfigurationError(
            f"a {kind.title} sink needs {kind.package.replace('_', '-')} ({exc}): pip install"
            f" 'changefeed[{kind.extra}]'"
        ) from exc
    return kind.make(spec, scheme, SinkOptions(fmt=fmt, model=model))


def _split_params(spec: str, scheme: str, consumed: frozenset[str]) -> tuple[str, dict[str, str]]:
    """``spec`` with ``scheme`` and without the query parameters in ``consumed``, and those
    parameters (the last value of each)."""
    try:
        parts = urlsplit(spec)
    except ValueError as exc:  # an unclosed [ of an IPv6 address, say
        raise ConfigurationError(f"bad URL {redact(spec)!r}: {exc}") from None
    params = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    kept = {name: value for name, value in params.items() if name not in consumed}
    url = urlunsplit((scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))
    return url, {name: value for name, value in params.items() if name in consumed}


HTTP_TIMEOUTS = frozenset({"timeout", "connect_timeout", "read_timeout"})
"""The query parameters an HTTP sink takes out of its URL: seconds for each phase of a request,
for connecting, and for the answer."""


class _Timeouts(TypedDict, total=False):
    timeout: float
    connect_timeout: float
    read_timeout: float


def _timeouts(params: dict[str, str]) -> _Timeouts:
    timeouts = _Timeouts()
    if "timeout" in params:
        timeouts["timeout"] = parse_seconds(params["timeout"], "timeout")
    if "connect_timeout" in params:
        timeouts["connect_timeout"] = parse_seconds(params["connect_timeout"], "connect_timeout")
    if "read_timeout" in params:
        timeouts["read_timeout"] = parse_seconds(params["read_timeout"], "read_timeout")
    return timeouts


def _webhook(spec: str, scheme: str, options: SinkOptions) -> Sink:
    from changefeed.pipelines.sinks.http import WebhookSink

    url, params = _split_params(spec, scheme, HTTP_TIMEOUTS)
    return WebhookSink(url, secret=os.environ.get(WEBHOOK_SECRET_ENV) or None,
                       **_timeouts(params))


def _snorky(spec: str, scheme: str, options: SinkOptions) -> Sink:
    from changefeed.pipelines.sinks.http import SnorkySink

    if options.fmt != "delta":
        raise ConfigurationError(f"a Snorky sink takes deltas: drop --format {options.fmt}")
    url, params = _split_params(spec, scheme.partition("+")[2],
                                frozenset({"service", "key", *HTTP_TIMEOUTS}))
    if not params.get("key"):
        raise ConfigurationError(
            "a Snorky sink needs its backend key: snorky+http://host:port/backend"
            "?service=NAME&key=KEY"
        )
    return SnorkySink(url, service=params.get("service") or "datasync_backend",
                      key=params["key"], model=options.model, **_timeouts(params))


def _redis(spec: str, scheme: str, options: SinkOptions) -> Sink:
    from changefeed.pipelines.sinks.redis import RedisStreamSink

    url, params = _split_params(spec, scheme, frozenset({"stream", "maxlen"}))
    stream = params.get("stream")
    if not stream:
        raise ConfigurationError("a Redis sink needs a stream name: redis://host:port/0?stream=NAME")
    maxlen = params.get("maxlen")
    return RedisStreamSink(url, stream,
                           maxlen=parse_count(maxlen, "maxlen") if maxlen is not None else None)


def _kafka(spec: str, scheme: str, options: SinkOptions) -> Sink:
    """``kafka://USER:PASSWORD@HOST:PORT`` authenticates with SASL (``mechanism=`` PLAIN by
    default, or SCRAM-SHA-256/512) over plaintext; ``kafkas://`` uses TLS. ``topic=`` is the
    topic template (default ``{table}``), ``timeout=SECONDS`` bounds how long a batch may wait
    for the broker (default 30). Other query parameters are librdkafka settings
    (``?compression.type=zstd``)."""
    from changefeed.pipelines.sinks.kafka import KafkaSink

    try:
        parts = urlsplit(spec)
    except ValueError as exc:
        raise ConfigurationError(f"bad URL {redact(spec)!r}: {exc}") from None
    if not parts.hostname:
        raise ConfigurationError(f"a Kafka sink needs brokers: kafka://HOST:PORT?topic=NAME, not"
                                 f" {redact(spec)!r}")
    params = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    topic = params.pop("topic", "{table}")
    mechanism = params.pop("mechanism", "PLAIN")
    seconds = parse_seconds(params.pop("timeout", "30"), "timeout")
    config: dict[str, Any] = dict(params)
    secure = scheme == "kafkas"
    if parts.username:
        config.update({
            "security.protocol": "SASL_SSL" if secure else "SASL_PLAINTEXT",
            "sasl.mechanism": mechanism,
            "sasl.username": parts.username,
            "sasl.password": parts.password or "",
        })
    elif secure:
        config["security.protocol"] = "SSL"
    brokers = parts.netloc.rpartition("@")[2]
    return KafkaSink(brokers, topic, fmt=options.fmt, model=options.model, config=config,
                     timeout=seconds, label=redact(spec))


SINK_KINDS = (
    SinkKind("webhook", ("http", "https"), "http(s)://", "httpx", "http", _webhook),
    SinkKind("Snorky", ("snorky+http", "snorky+https"), "snorky+http(s)://", "httpx", "http",
             _snorky),
    SinkKind("Redis", ("redis", "rediss"), "redis://", "redis", "redis", _redis),
    SinkKind("Kafka", ("kafka", "kafkas"), "kafka://", "confluent_kafka", "kafka", _kafka),
)
"""Every kind of sink a URL can name, in the order messages list them."""

__all__ = ["SINK_KINDS", "SinkKind", "SinkOptions", "WEBHOOK_SECRET_ENV",
           "sink_from_spec"]
