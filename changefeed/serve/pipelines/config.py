"""The config file of ``changefeed serve``: named pipelines in TOML, checked before anything runs.

    [defaults]                    # optional: keys every pipeline takes unless it sets its own
    url = "${DATABASE_URL}"

    [pipelines.orders]            # the pipeline's name: its label in metrics, logs and health
    tables = ["orders", "order_lines"]
    ops = ["insert", "update"]
    sink = "/var/lib/changefeed/orders.jsonl"

A pipeline takes the options of ``changefeed run`` as keys (`PIPELINE_KEYS`; the README's
Operate section lists them), and sources ``changefeed run`` does not read: a Kafka topic or a
Redis stream that a sink of another pipeline wrote (``url = "kafka://..."`` with ``topics``,
``url = "redis://..."`` with ``stream``). ``${VAR}`` and ``${VAR:-default}`` in any string take
the environment's value (``$${`` is a literal ``${``); those values are secrets from then on
(`changefeed.redact.register_secret`).

`load_config` checks everything it can without connecting: TOML syntax, keys and types, the
variables, each pipeline's options together (the same checks as ``changefeed run``: the feed and
the sinks are made, not opened), and names, slots and checkpoints shared between pipelines.
`check_tables` then connects to each PostgreSQL database to resolve the table names and patterns,
creating nothing. Every problem is a `ConfigurationError` of one line naming the file, the line
and the key: ``changefeed.toml:7: pipelines.orders.sink: unsupported sink 'ftp://x': ...``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

from changefeed.bounds import count_problem, seconds_problem
from changefeed.change import ALL, Operation
from changefeed.errors import ChangefeedError, ConfigurationError
from changefeed.redact import redact, register_secret
from changefeed.registry import is_postgresql_url
from changefeed.serve.pipelines.toml_lines import Path, key_lines, keys_on_line, tomllib

log = logging.getLogger("changefeed.serve")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,51}")
"""A pipeline's name: a metrics label and, lower-cased with ``-`` as ``_``, its slot's suffix."""
READ_BACK_SCHEMES = {"kafka": "kafka", "kafkas": "kafka", "redis": "redis", "rediss": "redis"}
"""Source URLs that read back what a sink wrote, rather than a database's changes."""


@dataclass(frozen=True)
class Key:
    """A key a pipeline may set: what TOML types it takes, and how messages describe them."""

    name: str
    kinds: tuple[type, ...]
    shown: str
    check: Callable[[Any], str | None] | None = None
    """Returns what is wrong with a value of the right type (None: nothing)."""


def _count(value: Any) -> str | None:
    return count_problem(value)


def _seconds(value: Any) -> str | None:
    return seconds_problem(value)


def _strings(value: Any) -> str | None:
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        return "must hold strings only"
    if isinstance(value, list) and not value:
        return "must not be empty"
    return None


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"unknown value {json.dumps(value)}: use " + (
            " or ".join(", ".join(choices).rsplit(", ", 1)))

    return check


def _model(value: Any) -> str | None:
    if isinstance(value, dict) and not all(isinstance(v, str) for v in value.values()):
        return "must map table names to model names (strings)"
    return None


_STRING, _STRINGS = (str,), (str, list)
_NUMBER = (int, float)
PIPELINE_KEYS: dict[str, Key] = {key.name: key for key in (
    Key("url", _STRING, "a string"),
    Key("tables", _STRINGS, "a string or an array of strings", _strings),
    Key("topics", _STRINGS, "a string or an array of strings", _strings),
    Key("stream", _STRING, "a string"),
    Key("group", _STRING, "a string"),
    Key("consumer", _STRING, "a string"),
    Key("ops", _STRINGS, "a string or an array of strings", _strings),
    Key("prefeed", _STRING, "a string", _one_of("snapshot")),
    Key("format", _STRING, "a string", _one_of("delta", "change", "debezium")),
    Key("model", (str, dict), "a string or a table of strings", _model),
    Key("exclude", _STRINGS, "a string or an array of strings", _strings),
    Key("chunk_size", (int,), "an integer", _count),
    Key("slot", _STRING, "a string"),
    Key("publication", _STRING, "a string"),
    Key("checkpoint", _STRING, "a string"),
    Key("limit", (int,), "an integer", _count),
    Key("idle_timeout", _NUMBER, "a number of seconds", _seconds),
    Key("until_idle", _NUMBER, "a number of seconds", _seconds),
    Key("where", _STRING, "a string"),
    Key("filter", (str, list), "a string or an array"),
    Key("stages", _STRINGS, "a string or an array of strings", _strings),
    Key("sink", _STRING, "a string"),
    Key("dead_letter", _STRING, "a string"),
    Key("processes", (bool,), "true or false"),
    Key("messages", _STRINGS, "a string or an array of strings", _strings),
    Key("quiet", (bool,), "true or false"),
    Key("enabled", (bool,), "true or false"),
    Key("restart_delay", _NUMBER, "a number of seconds", _seconds),
    Key("restart_max_delay", _NUMBER, "a number of seconds", _seconds),
    Key("stop_timeout", _NUMBER, "a number of seconds", _seconds),
)}
"""Every key of a pipeline (and of ``[defaults]``)."""
OLD_NAMES = {"until_idle": "idle_timeout"}
"""Keys still accepted under the name they had, and the key each is now."""
TOP_KEYS = ("pipelines", "defaults")
DATABASE_ONLY = ("tables", "prefeed", "exclude", "chunk_size", "slot", "publication",
                 "checkpoint", "messages")
READ_BACK_ONLY = {"kafka": ("topics", "group"), "redis": ("stream", "group", "consumer")}


@dataclass(frozen=True)
class Supervision:
    """How a pipeline is supervised (the ``restart_*`` and ``stop_timeout`` keys)."""

    restart_delay: float = 1.0
    """Seconds before the first restart after a failure; doubling per failure in a row."""
    restart_max_delay: float = 60.0
    """The longest wait between restarts."""
    stop_timeout: float = 30.0
    """Seconds a stopping pipeline gets to deliver and acknowledge before it is killed."""


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline of the file, checked: what its process needs to run it (`to_json`)."""

    name: str
    options: dict[str, Any]
    """`changefeed.cli.run.RunOptions` fields, JSON values (``ops`` as a list of names)."""
    source: dict[str, Any]
    """``{"kind": "database"}``, or the read-back source: kind, topics/stream, group, ..."""
    enabled: bool = True
    supervision: Supervision = field(default_factory=Supervision)
    secrets: tuple[str, ...] = ()
    """Values the file took from the environment: masked in every output of its process."""
    origins: dict[str, Path] = field(default_factory=dict, compare=False, repr=False)
    """Where each key's value was set (in its table or in ``[defaults]``), for messages."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "source": self.source,
                "secrets": list(self.secrets)}

    @property
    def fingerprint(self) -> str:
        """Equal for two specs that run the same way (a reload restarts a pipeline whose
        fingerprint changed)."""
        return json.dumps([self.to_json(), self.enabled, self.supervision.__dict__],
                          sort_keys=True, default=str)


@dataclass
class ServeConfig:
    """A config file, checked: its pipelines by name, in file order."""

    path: str
    pipelines: dict[str, PipelineSpec]
    locate: Callable[[Path], str] = field(repr=False, default=lambda path: "")
    """``path`` -> ``file:line: key`` for messages about a key found later (`check_tables`)."""


class _Located(ConfigurationError):
    """A problem at a key path, before it is given its file and line."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def dotted(path: Path) -> str:
    """``("pipelines", "orders", "tables", 1)`` -> ``pipelines.orders.tables[1]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            text += f".{shown}" if text else shown
    return text


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
                ) -> ServeConfig:
    """Read and check the config file at ``path`` (see the module's notes); connects nowhere.

    Raises `ConfigurationError` with one line: ``FILE:LINE: KEY: problem``."""
    shown = os.fspath(path)
    try:
        raw = FilePath(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {shown}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigurationError(f"{shown}:{line}: not UTF-8 text (TOML files are)") from None
    deep = too_deep(text)
    if deep is not None:
        raise ConfigurationError(f"{shown}:{deep}: arrays and inline tables nest more than"
                                 f" {MAX_NESTING} levels deep")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(_syntax_error(shown, text, str(exc))) from None
    lines = key_lines(text)

    def locate(where: Path) -> str:
        for size in range(len(where), 0, -1):  # a key's own line, else its nearest parent's
            if where[:size] in lines:
                return f"{shown}:{lines[where[:size]]}: {dotted(where)}"
        return f"{shown}: {dotted(where)}"

    try:
        pipelines = _pipelines(data, dict(os.environ if environ is None else environ))
    except _Located as exc:
        where = locate(exc.path) if exc.path else shown
        raise ConfigurationError(f"{where}: {redact(exc.message)}") from None
    return ServeConfig(shown, pipelines, locate)


MAX_NESTING = 128
"""How deep arrays and inline tables may nest in the file: more than a filter may
(`changefeed.pipelines.filters.MAX_DEPTH`), far less than what would exhaust Python's stack in
``tomllib`` (a recursive parser: two frames a level) or in the checks after it."""
_TOML_TOKENS = re.compile(r'"""|' + r"'''" + r"""|["'#\[\]{}\n]""")


def too_deep(text: str) -> int | None:
    """The line where arrays and inline tables in the TOML ``text`` first nest deeper than
    `MAX_NESTING`, or None. A scan of brackets outside strings and comments, made before
    ``tomllib`` parses (and recurses) at all; it decides nothing else."""
    depth = 0
    line = 1
    position = 0
    while True:
        match = _TOML_TOKENS.search(text, position)
        if match is None:
            return None
        token = match.group()
        position = match.end()
        if token == "\n":
            line += 1
        elif token == "#":
            end = text.find("\n", position)
            position = len(text) if end < 0 else end
        elif token in ('"""', "'''", '"', "'"):
            end = _string_end(text, position, token)
            line += text.count("\n", position, end)
            position = end
        elif token in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return line
        else:
            depth = max(0, depth - 1)


def _string_end(text: str, position: int, quote: str) -> int:
    """Where the string opened by ``quote`` just before ``position`` ends (after its closing
    quote; at the newline of a one-line string that lacks one: tomllib says what is wrong)."""
    escapes = quote.startswith('"')
    while position < len(text):
        char = text[position]
        if escapes and char == "\\":
            position += 2
            continue
        if len(quote) == 1 and char == "\n":
            return position
        if text.startswith(quote, position):
            return position + len(quote)
        position += 1
    return position


def _syntax_error(shown: str, text: str, message: str) -> str:
    """tomllib's message as ``FILE:LINE: KEY: problem`` (its position says line and column)."""
    match = re.search(r" \(at line (\d+), column \d+\)$", message)
    if match is not None:
        line = int(match.group(1))
    else:
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
    problem = re.sub(r" \(at (line \d+, column \d+|end of document)\)$", "", message)
    declared = re.fullmatch(r"Cannot declare \((.*)\) twice", problem)
    if declared is not None:
        names = re.findall(r"'((?:[^'\\]|\\.)*)'", declared.group(1))
        return f"{shown}:{line}: {dotted(tuple(names))}: declared twice (names must be unique)"
    keys = keys_on_line(text, line)
    if problem == "Cannot overwrite a value" and keys:
        return f"{shown}:{line}: {dotted(keys[0])}: set twice"
    where = f" {dotted(keys[0])}:" if keys else ""
    return f"{shown}:{line}:{where} invalid TOML: {problem[:1].lower()}{problem[1:]}"


# -- the variables ------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def substitute(value: Any, path: Path, environ: Mapping[str, str], secrets: list[str]) -> Any:
    """``value`` with every ``${VAR}`` in its strings replaced; the values used go to
    ``secrets``. Raises `_Located` for an unset variable or a malformed reference."""
    if isinstance(value, dict):
        return {key: substitute(item, (*path, key), environ, secrets)
                for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, (*path, index), environ, secrets)
                for index, item in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        if token == "${":
            raise _Located("malformed ${...}: use ${NAME} or ${NAME:-default} (and $${ for a"
                           " literal ${)", path)
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                raise _Located(f"environment variable {name} is not set", path)
            found = default
        else:
            secrets.append(found)
            register_secret(found)
        return found

    return _VARIABLE.sub(replace, value)


# -- the pipelines ------------------------------------------------------------------------------

def _pipelines(data: dict[str, Any], environ: dict[str, str]) -> dict[str, PipelineSpec]:
    for key in data:
        if key not in TOP_KEYS:
            raise _Located(_unknown(key, TOP_KEYS, "top-level table"), (key,))
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise _Located("must be a table of pipeline keys: [defaults]", ("defaults",))
    tables = data.get("pipelines")
    if tables is None:
        raise _Located("no [pipelines.NAME] table: nothing to run", ())
    if not isinstance(tables, dict):
        raise _Located("must be tables named after their pipelines: [pipelines.NAME]",
                       ("pipelines",))
    if not tables:
        raise _Located("no [pipelines.NAME] table: nothing to run", ("pipelines",))
    default_secrets: dict[str, list[str]] = {key: [] for key in defaults}
    defaults = {key: substitute(value, ("defaults", key), environ, default_secrets[key])
                for key, value in defaults.items()}
    _check_keys(defaults, ("defaults",))
    defaults, default_origins = _new_names(defaults, ("defaults",))
    default_secrets = {OLD_NAMES.get(key, key): found for key, found in default_secrets.items()}
    specs: dict[str, PipelineSpec] = {}
    normalized: dict[str, str] = {}
    for name, table in tables.items():
        where: Path = ("pipelines", name)
        if not isinstance(table, dict):
            raise _Located("must be a table of keys: [pipelines.NAME]", where)
        if not NAME.fullmatch(name):
            raise _Located("a pipeline's name is 1 to 52 letters, digits, '_' and '-', starting"
                           " with a letter or digit", where)
        same = normalized.get(_normalized(name))
        if same is not None:
            raise _Located(f"duplicate name: {same!r} is the same name for slots and metrics"
                           " (case and '-'/'_' do not count)", where)
        normalized[_normalized(name)] = name
        secrets: list[str] = []
        table = substitute(table, where, environ, secrets)
        _check_keys(table, where)
        table, table_origins = _new_names(table, where)
        values = {**defaults, **table}
        origins = {key: table_origins[key] if key in table else default_origins[key]
                   for key in values}
        secrets += [secret for key, found in default_secrets.items() if key not in table
                    for secret in found]
        try:
            specs[name] = _spec(name, values, origins, where, secrets)
        except _Located as exc:
            if exc.path and exc.path[0] == "defaults":  # say which pipeline it broke
                raise _Located(f"pipeline {name}: {exc.message}", exc.path) from None
            raise
    _check_shared(specs)
    return specs


def _normalized(name: str) -> str:
    return name.lower().replace("-", "_")


def _unknown(key: str, known: tuple[str, ...] | list[str], what: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
    return f"unknown {what}{hint}"


def _check_keys(table: dict[str, Any], where: Path) -> None:
    for key, value in table.items():
        spec = PIPELINE_KEYS.get(key)
        if spec is None:
            known = [name for name in PIPELINE_KEYS if name not in OLD_NAMES]
            raise _Located(_unknown(key, known, "key"), (*where, key))
        if isinstance(value, bool) and bool not in spec.kinds or not isinstance(value, spec.kinds):
            raise _Located(f"expected {spec.shown}, not {_describe(value)}", (*where, key))
        problem = spec.check(value) if spec.check is not None else None
        if problem is not None:
            raise _Located(problem, (*where, key))


def _new_names(table: dict[str, Any], where: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """``table`` with its keys under their current names (`OLD_NAMES`), and where each key was
    written (for messages, which name the key as the file does)."""
    origins: dict[str, Path] = {key: (*where, key) for key in table}
    for old, new in OLD_NAMES.items():
        if old in table:
            if new in table:
                raise _Located(f"{old} is the old name of {new}: give one", (*where, old))
            table = {new if key == old else key: value for key, value in table.items()}
            origins[new] = origins.pop(old)
    return table, origins


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "the string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return f"{kind} {json.dumps(value)}"
    if isinstance(value, bool):
        return f"{kind} ({str(value).lower()})"
    return kind


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def _spec(name: str, values: dict[str, Any], origins: dict[str, Path], where: Path,
          secrets: list[str]) -> PipelineSpec:
    def missing(key: str, why: str) -> _Located:
        return _Located(f"{key} is missing: {why}", where)

    url = values.get("url")
    if url is None:
        raise missing("url", "the source's URL (a database's, or kafka:// or redis:// to read"
                             " back what a sink wrote)")
    if "sink" not in values:
        raise missing("sink", "where to deliver (a file, -, http(s)://..., redis://...,"
                              " kafka://...; see changefeed run --help)")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    kind = READ_BACK_SCHEMES.get(scheme, "database")
    for key in list(values):
        if kind == "database":
            fits = not any(key in keys for keys in READ_BACK_ONLY.values())
            problem = ("applies to kafka:// and redis:// sources only, not to a database URL;"
                       " a database source names tables")
        else:
            fits = key not in DATABASE_ONLY and (
                key not in sum(READ_BACK_ONLY.values(), ()) or key in READ_BACK_ONLY[kind])
            problem = f"does not apply to a {scheme}:// source"
        if fits:
            continue
        if origins[key][0] == "defaults":  # meant for the pipelines of other sources
            del values[key]
            continue
        raise _Located(problem, origins[key])
    source: dict[str, Any] = {"kind": kind}
    if kind == "database":
        tables = _as_list(values.get("tables"))
        if not tables:
            raise missing("tables", "the tables (or patterns such as 'public.*') to stream")
    elif kind == "kafka":
        tables = []
        source["topics"] = _as_list(values.get("topics"))
        if not source["topics"]:
            raise missing("topics", "the Kafka topics to read")
        source["group"] = values.get("group") or f"changefeed-{name}"
    else:
        tables = []
        if not values.get("stream"):
            raise missing("stream", "the Redis stream to read")
        source["stream"] = values["stream"]
        source["group"] = values.get("group") or f"changefeed-{name}"
        source["consumer"] = values.get("consumer") or f"{socket.gethostname()}-{name}"
    with _at(origins, "ops"):
        ops = Operation.parse(",".join(_as_list(values.get("ops")))) if "ops" in values else ALL
    filter_value = values.get("filter")
    options = {
        "tables": tables,
        "url": url,
        "ops": ops.names,
        "prefeed": values.get("prefeed"),
        "fmt": values.get("format", "delta"),
        "model": values.get("model"),
        "exclude": _as_list(values.get("exclude")),
        "chunk_size": values.get("chunk_size"),
        "slot": values.get("slot"),
        "publication": values.get("publication"),
        "checkpoint": values.get("checkpoint"),
        "limit": values.get("limit"),
        "idle_timeout": values.get("idle_timeout"),
        "where": values.get("where"),
        "filter": json.dumps(filter_value) if isinstance(filter_value, list) else filter_value,
        "stages": _as_list(values.get("stages")),
        "sink": values["sink"],
        "dead_letter": values.get("dead_letter"),
        "processes": values.get("processes", False),
        "messages": _as_list(values.get("messages")),
        "quiet": values.get("quiet", False),
    }
    if kind == "database" and options["slot"] is None and is_postgresql_url(url):
        options["slot"] = default_slot(name)  # per pipeline: two pipelines may read one table
    supervision = Supervision(**{key: float(values[key]) for key in Supervision.__dataclass_fields__
                                 if key in values})
    if supervision.restart_max_delay < supervision.restart_delay:
        key = "restart_max_delay" if "restart_max_delay" in values else "restart_delay"
        raise _Located(f"restart_max_delay ({supervision.restart_max_delay:g} s) is shorter than"
                       f" restart_delay ({supervision.restart_delay:g} s)", origins[key])
    spec = PipelineSpec(name, options, source, values.get("enabled", True), supervision,
                        tuple(dict.fromkeys(secrets)), origins)
    with _at(origins, None, default=where):
        build(spec)  # the options together, as `changefeed run` checks them
    return spec


def default_slot(name: str) -> str:
    """A pipeline's slot (and publication) unless it names one: ``changefeed_<name>``."""
    return "changefeed_" + _normalized(name)


@contextmanager
def _at(origins: dict[str, Path], key: str | None, default: Path = ()) -> Iterator[None]:
    """Locate a `ConfigurationError` raised inside at ``key`` (or the key an `OptionError`
    blames, or ``default``)."""
    from changefeed.cli.pipeline_options import OptionError

    try:
        yield
    except _Located:
        raise
    except ConfigurationError as exc:
        blamed = key or (exc.option if isinstance(exc, OptionError) else None)
        config_key = {"fmt": "format"}.get(blamed or "", blamed)
        path = origins.get(config_key or "", default)
        raise _Located(exc.message, path) from exc


def _check_shared(specs: dict[str, PipelineSpec]) -> None:
    """What two pipelines must not share: a slot of one database, a checkpoint file."""
    slots: dict[tuple[str, str], str] = {}
    checkpoints: dict[str, str] = {}
    for name, spec in specs.items():
        options = spec.options
        if spec.source["kind"] == "database":
            database = _database_of(options["url"])
            other = slots.setdefault((database, options["slot"]), name)
            if other != name:
                key = "slot" if "slot" in spec.origins else "url"
                raise _Located(f"slot {options['slot']} is also pipeline {other}'s: two feeds"
                               " cannot share a slot; name another slot", spec.origins[key])
        if options["checkpoint"]:
            other = checkpoints.setdefault(os.path.abspath(options["checkpoint"]), name)
            if other != name:
                raise _Located(f"pipeline {other} keeps its checkpoint in the same file",
                               spec.origins["checkpoint"])


def _database_of(url: str) -> str:
    """What tells two PostgreSQL databases apart in a URL: host, port, database name."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
    except Exception:  # checked and reported with the pipeline's other options
        return url
    return f"{params.get('host')}:{params.get('port')}/{params.get('dbname')}"


# -- building what a spec describes ------------------------------------------------------------

@dataclass
class Built:
    """What a spec makes: the feed (not connected) and the parts of its pipeline."""

    feed: Any
    parts: Any
    """`changefeed.cli.pipeline_options.PipelineParts`."""
    options: Any
    """`changefeed.cli.run.RunOptions`."""


def run_options(spec: PipelineSpec) -> Any:
    """The spec's options as `changefeed.cli.run.RunOptions`."""
    from changefeed.cli.run import RunOptions

    values = dict(spec.options)
    values["ops"] = Operation.parse(",".join(values["ops"]))
    for key in ("tables", "exclude", "stages", "messages"):
        values[key] = tuple(values[key])
    return RunOptions(**values)


def build(spec: PipelineSpec) -> Built:
    """The feed and pipeline parts of ``spec``, made as ``changefeed run`` makes them: checks
    every option (raising `changefeed.cli.pipeline_options.OptionError`), connects nowhere."""
    from changefeed.cli.pipeline_options import blame, pipeline_parts
    from changefeed.cli.run import check_options, make_feed

    options = run_options(spec)

    def flag(option: str) -> str:
        return {"fmt": "format", "tables": "tables"}.get(option, option)

    if spec.source["kind"] == "database":
        feed_options = check_options(options, flag=flag, pipeline=True)
        feed = make_feed(options, {**feed_options, "name": spec.name})
    else:
        with blame("url"):
            feed = _read_back_feed(spec, options)
    parts = pipeline_parts(
        feed, where=options.where, filter=options.filter, stages=options.stages,
        sink=options.sink, dead_letter=options.dead_letter, fmt=options.fmt,
        model=options.model, flag=flag,
    )
    return Built(feed, parts, options)


def _read_back_feed(spec: PipelineSpec, options: Any) -> Any:
    """A `KafkaFeed` or `RedisStreamFeed` for a ``kafka://`` or ``redis://`` source URL."""
    from urllib.parse import parse_qs, urlsplit

    source = spec.source
    url = options.url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises for a port that is not a number)
    except ValueError as exc:
        raise ConfigurationError(f"bad URL: {exc}") from exc
    if not parts.hostname:
        raise ConfigurationError(f"a {source['kind']} source needs a host: {redact(url)!r}")
    try:
        if source["kind"] == "kafka":
            from changefeed.backends.kafka import KafkaFeed

            config: dict[str, Any] = {name: values[-1]
                                      for name, values in parse_qs(parts.query).items()}
            secure = parts.scheme.lower() == "kafkas"
            mechanism = config.pop("mechanism", "PLAIN")
            if parts.username:
                config.update({
                    "security.protocol": "SASL_SSL" if secure else "SASL_PLAINTEXT",
                    "sasl.mechanism": mechanism, "sasl.username": parts.username,
                    "sasl.password": parts.password or "",
                })
            elif secure:
                config["security.protocol"] = "SSL"
            return KafkaFeed(parts.netloc.rpartition("@")[2], source["topics"], source["group"],
                             options.ops, config=config)
        from changefeed.backends.redis_streams import RedisStreamFeed

        return RedisStreamFeed(url, source["stream"], source["group"], source["consumer"],
                               options.ops)
    except ImportError as exc:
        extra = source["kind"]
        raise ConfigurationError(f"a {extra} source needs its driver: pip install"
                                 f" 'changefeed[{extra}]' ({exc})") from exc


# -- what only the database can tell -------------------------------------------------------------

def check_tables(config: ServeConfig, names: list[str] | None = None,
                 timeout: float = 5.0) -> None:
    """Resolve the tables and patterns of the PostgreSQL pipelines ``names`` (default: all) on
    their databases, creating nothing: a name or pattern that matches no table is a
    `ConfigurationError` at its key. A database that cannot be reached is left for the
    pipeline to retry (a warning here), since it may well come up later."""
    for name, spec in config.pipelines.items():
        if names is not None and name not in names:
            continue
        if spec.source["kind"] != "database" or not is_postgresql_url(spec.options["url"]):
            continue
        origins = spec.origins
        try:
            _resolve_tables(spec, timeout)
        except ConfigurationError as exc:
            key = "exclude" if "exclude" in exc.message and "exclude" in origins else "tables"
            raise ConfigurationError(f"{config.locate(origins[key])}: {redact(exc.message)}"
                                     ) from None
        except ChangefeedError as exc:
            log.warning("%s: cannot check its tables now (%s); it will retry", name,
                        redact(exc.message), extra={"pipeline": name})


def _resolve_tables(spec: PipelineSpec, timeout: float) -> None:
    import psycopg

    from changefeed.backends.postgres import tables
    from changefeed.backends.postgres.names import parse_table_name, split_tables
    from changefeed.errors import TransientBackendError

    options = spec.options
    try:
        conn = psycopg.connect(options["url"], autocommit=True, connect_timeout=timeout)
    except psycopg.Error as exc:
        raise TransientBackendError(str(exc).strip().splitlines()[0]) from exc
    with conn:
        names = [parse_table_name(table) for table in split_tables(options["tables"])]
        exclude = [parse_table_name(table) for table in split_tables(options["exclude"])]
        tables.resolve_tables(conn, names, exclude)


__all__ = ["Built", "PIPELINE_KEYS", "PipelineSpec", "ServeConfig", "Supervision", "build",
           "check_tables", "default_slot", "dotted", "load_config", "run_options", "substitute"]
