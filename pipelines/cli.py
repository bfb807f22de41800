"""What the ``changefeed run`` command needs to build a pipeline from its options.

The CLI calls one function::

    pipeline = build_cli_pipeline(feed, where=..., filter=..., sink=..., dead_letter=...,
                                  fmt="delta", model=None)
    pipeline.run(stop_after=limit, idle_timeout=until_idle)

``--sink SPEC`` (`make_sink`), also used for ``--dead-letter SPEC``:

=============================================================  ==================================
``-``                                                          JSON lines on stdout (default)
a file path                                                    JSON lines appended to the file
``http://...``, ``https://...``                                webhook: JSON array per batch;
                                                               ``$CHANGEFEED_WEBHOOK_SECRET``
                                                               signs it (HMAC-SHA256)
``snorky+http://host:port/backend?service=NAME&key=KEY``        Snorky's publishDeltas
                                                               (``snorky+https`` too)
``redis://host:port/0?stream=NAME``                            Redis stream (``rediss://`` too)
``kafka://host:port[,host:port]?topic={table}``                Kafka topic per table (keyed by
                                                               primary key; see
                                                               `changefeed.pipelines.kafka`)
=============================================================  ==================================

``--where EXPR`` (`parse_where`) keeps changes whose row (the new row; the old one for a
delete) matches ``EXPR``: comparisons ``field OP value`` with OP one of ``== != < <= > >=``,
a value written as in JSON or Python (``"open"``, ``'open'``, ``3``, ``2.5``, ``true``,
``false``, ``null``), dotted fields for nested JSON, combined with ``and``, ``or``, ``not``
and parentheses: ``--where 'status == "open" and priority >= 2'``.

``--filter JSON`` takes a Snorky filter (``'["==", "color", "blue"]'``) and applies the
`subscription` stage: updates entering or leaving the filter become inserts or deletes.

``--format delta`` (default) sends Snorky deltas, ``--format change`` the whole change,
``--format debezium`` Debezium's envelope (`changefeed.pipelines.debezium`). A Snorky sink always
receives deltas and a Redis stream always holds whole changes (its readers apply their own
stages), whatever the format; a Kafka sink writes each record in the format given.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from changefeed.change import Change
from changefeed.cli import ACK_SECONDS
from changefeed.errors import ConfigurationError
from changefeed.pipelines.filters import Filter, compile_filter
from changefeed.pipelines.pipeline import Pipeline
from changefeed.pipelines.sinks import JsonLinesSink
from changefeed.pipelines.stages import subscription, to_delta, where
from changefeed.preflight import check_writable
from changefeed.redact import redact
from changefeed.registry import url_scheme

WEBHOOK_SECRET_ENV = "CHANGEFEED_WEBHOOK_SECRET"


def make_sink(
    spec: str, *, model: str | None = None, fmt: str = "delta", option: str = "--sink"
) -> Any:
    """The sink for a ``--sink`` value (see the module docstring for the forms).

    A file is checked writable now, so a run fails before it reads a change; ``option`` names
    the option in that message.
    """
    if fmt not in ("delta", "change", "debezium"):
        raise ConfigurationError(f"unknown format {fmt!r}: use delta, change or debezium")
    if spec == "-":
        return JsonLinesSink("-")
    scheme = url_scheme(spec)
    if scheme in ("http", "https"):
        from changefeed.pipelines.sinks.http import WebhookSink

        return WebhookSink(spec, secret=os.environ.get(WEBHOOK_SECRET_ENV) or None)
    if scheme in ("snorky+http", "snorky+https"):
        from changefeed.pipelines.sinks.http import SnorkySink

        if fmt != "delta":
            raise ConfigurationError(f"a Snorky sink takes deltas: drop --format {fmt}")
        url, params = _split_params(spec, scheme.partition("+")[2])
        service, key = params.pop("service", None), params.pop("key", None)
        if not key:
            raise ConfigurationError(
                "a Snorky sink needs its backend key: snorky+http://host:port/backend"
                "?service=NAME&key=KEY"
            )
        return SnorkySink(url, service=service or "datasync_backend", key=key, model=model)
    if scheme in ("redis", "rediss"):
        from changefeed.pipelines.redis_streams import RedisStreamSink

        url, params = _split_params(spec, scheme)
        stream = params.pop("stream", None)
        if not stream:
            raise ConfigurationError(
                "a Redis sink needs a stream name: redis://host:port/0?stream=NAME"
            )
        maxlen = params.pop("maxlen", None)
        if maxlen is not None and not maxlen.isdigit():
            raise ConfigurationError(f"maxlen must be a number, not {maxlen!r}")
        return RedisStreamSink(url, stream, maxlen=int(maxlen) if maxlen else None)
    if scheme in ("kafka", "kafkas"):
        try:
            from changefeed.pipelines.kafka import sink_from_spec
        except ImportError as exc:
            raise ConfigurationError(
                f"a Kafka sink needs confluent-kafka ({exc}): pip install 'changefeed[kafka]'"
            ) from exc

        return sink_from_spec(spec, fmt=fmt, model=model)
    if scheme:
        raise ConfigurationError(
            f"unsupported sink {redact(spec)!r}: use -, a file path, http(s)://,"
            " snorky+http(s)://, redis:// or kafka://"
        )
    check_writable(spec, f"{option} file")
    return JsonLinesSink(spec)


def _split_params(spec: str, scheme: str) -> tuple[str, dict[str, str]]:
    """``spec`` with ``scheme``, and without the query parameters the sink consumes (others
    stay in the URL)."""
    parts = urlsplit(spec)
    params = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    kept = {name: value for name, value in params.items() if name not in _SINK_PARAMS}
    url = urlunsplit((scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))
    return url, {name: value for name, value in params.items() if name in _SINK_PARAMS}


_SINK_PARAMS = frozenset({"service", "key", "stream", "maxlen"})


# -- --where ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
      | (?P<op>==|!=|<=|>=|<|>)
      | (?P<paren>[()])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    )""",
    re.VERBOSE,
)
_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False,
              "None": None}


def parse_where(text: str) -> Filter:
    """Parse a ``--where`` expression into a Snorky filter.

    >>> parse_where('status == "open" and priority >= 2')
    ['and', ['==', 'status', 'open'], ['>=', 'priority', 2]]
    >>> parse_where("not (owner.name != 'ann')")
    ['not', ['not', ['==', 'owner.name', 'ann']]]

    Raises `ConfigurationError` pointing at the first thing it cannot read.
    """
    tokens: list[tuple[str, Any, int]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            column = len(text) - len(text[position:].lstrip())
            raise _where_error(text, column, "unexpected character")
        kind = match.lastgroup or ""
        raw = match.group(kind)
        start = match.start(kind)
        if kind == "string":
            value: Any = _string(raw, text, start)
        elif kind == "number":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        else:
            value = raw
        tokens.append((kind, value, start))
        position = match.end()
    parser = _WhereParser(text, tokens)
    result = parser.expression()
    if parser.index < len(tokens):
        raise _where_error(text, tokens[parser.index][2], "expected 'and', 'or' or the end")
    return result


def _string(raw: str, text: str, start: int) -> str:
    body = raw[1:-1]
    if raw[0] == "'":
        body = body.replace("\\'", "'").replace('"', '\\"')
    try:
        return str(json.loads(f'"{body}"'))
    except json.JSONDecodeError:
        raise _where_error(text, start, "bad string") from None


def _where_error(text: str, position: int, problem: str) -> ConfigurationError:
    return ConfigurationError(
        f"cannot read --where {text!r}: {problem} at column {position + 1}"
        f" (write comparisons like: status == \"open\" and priority >= 2)"
    )


class _WhereParser:
    """expression := conjunction ('or' conjunction)*; conjunction := term ('and' term)*;
    term := 'not' term | '(' expression ')' | field OP value."""

    def __init__(self, text: str, tokens: list[tuple[str, Any, int]]) -> None:
        self.text = text
        self.tokens = tokens
        self.index = 0

    def _peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _take(self, kind: str, value: Any = None) -> bool:
        token = self._peek()
        if token is not None and token[0] == kind and (value is None or token[1] == value):
            self.index += 1
            return True
        return False

    def _fail(self, problem: str) -> ConfigurationError:
        token = self._peek()
        return _where_error(self.text, token[2] if token else len(self.text), problem)

    def expression(self) -> Filter:
        parts = [self.conjunction()]
        while self._take("word", "or"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else ["or", *parts]

    def conjunction(self) -> Filter:
        parts = [self.term()]
        while self._take("word", "and"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else ["and", *parts]

    def term(self) -> Filter:
        if self._take("word", "not"):
            return ["not", self.term()]
        if self._take("paren", "("):
            inner = self.expression()
            if not self._take("paren", ")"):
                raise self._fail("expected ')'")
            return inner
        token = self._peek()
        if token is None or token[0] != "word" or token[1] in ("and", "or", "not"):
            raise self._fail("expected a field name")
        field = token[1]
        self.index += 1
        op = self._peek()
        if op is None or op[0] != "op":
            raise self._fail("expected one of == != < <= > >=")
        self.index += 1
        value_token = self._peek()
        if value_token is None:
            raise self._fail("expected a value")
        kind, value, _ = value_token
        if kind == "word" and value in _CONSTANTS:
            value = _CONSTANTS[value]
        elif kind not in ("string", "number"):
            raise self._fail("expected a value: a quoted string, a number, true, false or null")
        self.index += 1
        if op[1] == "!=":
            return ["not", ["==", field, value]]
        return [op[1], field, value]


def row_filter(filter: Filter) -> where:
    """A `where` stage keeping changes whose row (new, or old for a delete) matches ``filter``."""
    matches = compile_filter(filter)

    def row_matches(change: Change) -> bool:
        return matches(change.row or {})

    row_matches.__name__ = json.dumps(filter)
    return where(row_matches)


def parse_filter(text: str) -> Filter:
    """Parse a ``--filter`` JSON Snorky filter, checking its shape."""
    try:
        filter = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"--filter is not JSON ({exc.msg}): write it like '[\"==\", \"color\", \"blue\"]'"
        ) from exc
    compile_filter(filter)
    return filter


def build_cli_pipeline(
    feed: Any,
    *,
    where: str | None = None,
    filter: str | None = None,
    sink: str = "-",
    dead_letter: str | None = None,
    fmt: str = "delta",
    model: str | None = None,
    processes: bool = False,
) -> Pipeline:
    """The pipeline ``changefeed run`` runs: ``--where``, then ``--filter``, then the format.

    Acknowledges at most every `changefeed.cli.ACK_SECONDS` (and always at the end), as the
    command does without a pipeline.
    """
    out = make_sink(sink, model=model, fmt=fmt)
    stages: list[Any] = []
    if where:
        stages.append(row_filter(parse_where(where)))
    if filter:
        stages.append(subscription(parse_filter(filter)))
    # A sink that needs one kind of item (Snorky: deltas; a Redis stream: changes) says so.
    if fmt == "delta" and getattr(out, "accepts", "any") == "any":
        stages.append(to_delta(model))
    if fmt == "debezium" and getattr(out, "accepts", "any") == "any":
        from changefeed.pipelines.debezium import DebeziumEncoder, Source, database_of

        connection = getattr(feed, "connection", None)
        url = connection if isinstance(connection, str) else ""
        stages.append(DebeziumEncoder(Source(database=database_of(url))))
    letters = make_sink(dead_letter, option="--dead-letter") if dead_letter else None
    if letters is not None and getattr(letters, "accepts", "any") != "any":
        raise ConfigurationError(
            f"--dead-letter {dead_letter!r}: dead letters are JSON records; send them to a file,"
            " stdout or a webhook"
        )
    return Pipeline(
        feed, stages, sink=out, dead_letter=letters, processes=processes, ack_interval=ACK_SECONDS
    )
