"""The config file of ``changefeed serve``: named pipelines in TOML, checked before anything runs.

    [defaults]                    # optional: keys every pipeline takes unless it sets its own
    url = "${DATABASE_URL}"

    [pipelines.orders]            # the pipeline's name: its label in metrics, logs and health
    tables = ["orders", "order_lines"]
    ops = ["insert", "update"]
    sink = "/var/lib/changefeed/orders.jsonl"

A pipeline takes the options of ``changefeed run`` as keys (`keys.PIPELINE_KEYS`; the README's
Operate section lists them), and sources ``changefeed run`` does not read: a Kafka topic or a
Redis stream that a sink of another pipeline wrote (``url = "kafka://..."`` with ``topics``,
``url = "redis://..."`` with ``stream``). ``${VAR}`` in any string takes the environment's value
(`config_file.substitute`).

`load_config` checks everything it can without connecting: TOML syntax, keys and types, the
variables, each pipeline's options together (the same checks as ``changefeed run``: the feed and
the sinks are made, not opened, by `build.build`), and names, slots and checkpoints shared
between pipelines.
`check_tables` then connects to each PostgreSQL database to resolve the table names and patterns,
creating nothing. Every problem is a `ConfigurationError` of one line naming the file, the line
and the key: ``changefeed.toml:7: pipelines.orders.sink: unsupported sink 'ftp://x': ...``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from changefeed.change import ALL, Operation
from changefeed.errors import ChangefeedError, ConfigurationError
from changefeed.redact import redact
from changefeed.registry import is_postgresql_url
from changefeed.serve.pipelines.build import build
from changefeed.serve.pipelines.config_file import LocatedError, read_config_file, substitute
from changefeed.serve.pipelines.keys import (
    DATABASE_ONLY,
    NAME,
    OLD_NAMES,
    READ_BACK_ONLY,
    READ_BACK_SCHEMES,
    TOP_KEYS,
    check_keys,
    current_names,
    unknown,
)
from changefeed.serve.pipelines.specs import PipelineSpec, ServeConfig, Supervision
from changefeed.serve.pipelines.toml_lines import Path

log = logging.getLogger("changefeed.serve")


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
                ) -> ServeConfig:
    """Read and check the config file at ``path`` (see the module's notes); connects nowhere.

    Raises `ConfigurationError` with one line: ``FILE:LINE: KEY: problem``."""
    file = read_config_file(path)
    try:
        pipelines = _pipelines(file.data, dict(os.environ if environ is None else environ))
    except LocatedError as exc:
        where = file.locate(exc.path) if exc.path else file.shown
        raise ConfigurationError(f"{where}: {redact(exc.message)}") from None
    return ServeConfig(file.shown, pipelines, file.locate)


# -- the pipelines ------------------------------------------------------------------------------

def _pipelines(data: dict[str, Any], environ: dict[str, str]) -> dict[str, PipelineSpec]:
    for key in data:
        if key not in TOP_KEYS:
            raise LocatedError(unknown(key, TOP_KEYS, "top-level table"), (key,))
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise LocatedError("must be a table of pipeline keys: [defaults]", ("defaults",))
    tables = data.get("pipelines")
    if tables is None:
        raise LocatedError("no [pipelines.NAME] table: nothing to run", ())
    if not isinstance(tables, dict):
        raise LocatedError("must be tables named after their pipelines: [pipelines.NAME]",
                           ("pipelines",))
    if not tables:
        raise LocatedError("no [pipelines.NAME] table: nothing to run", ("pipelines",))
    default_secrets: dict[str, list[str]] = {key: [] for key in defaults}
    defaults = {key: substitute(value, ("defaults", key), environ, default_secrets[key])
                for key, value in defaults.items()}
    check_keys(defaults, ("defaults",))
    defaults, default_origins = current_names(defaults, ("defaults",))
    default_secrets = {OLD_NAMES.get(key, key): found for key, found in default_secrets.items()}
    specs: dict[str, PipelineSpec] = {}
    normalized: dict[str, str] = {}
    for name, table in tables.items():
        where: Path = ("pipelines", name)
        if not isinstance(table, dict):
            raise LocatedError("must be a table of keys: [pipelines.NAME]", where)
        if not NAME.fullmatch(name):
            raise LocatedError("a pipeline's name is 1 to 52 letters, digits, '_' and '-', starting"
                               " with a letter or digit", where)
        same = normalized.get(_normalized(name))
        if same is not None:
            raise LocatedError(f"duplicate name: {same!r} is the same name for slots and metrics"
                               " (case and '-'/'_' do not count)", where)
        normalized[_normalized(name)] = name
        secrets: list[str] = []
        table = substitute(table, where, environ, secrets)
        check_keys(table, where)
        table, table_origins = current_names(table, where)
        values = {**defaults, **table}
        origins = {key: table_origins[key] if key in table else default_origins[key]
                   for key in values}
        secrets += [secret for key, found in default_secrets.items() if key not in table
                    for secret in found]
        try:
            specs[name] = _spec(name, values, origins, where, secrets)
        except LocatedError as exc:
            if exc.path and exc.path[0] == "defaults":  # say which pipeline it broke
                raise LocatedError(f"pipeline {name}: {exc.message}", exc.path) from None
            raise
    _check_shared(specs)
    return specs


def _normalized(name: str) -> str:
    return name.lower().replace("-", "_")

def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def _spec(name: str, values: dict[str, Any], origins: dict[str, Path], where: Path,
          secrets: list[str]) -> PipelineSpec:
    def missing(key: str, why: str) -> LocatedError:
        return LocatedError(f"{key} is missing: {why}", where)

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
        raise LocatedError(problem, origins[key])
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
        "workers": values.get("workers", 1),
        "messages": _as_list(values.get("messages")),
        "quiet": values.get("quiet", False),
    }
    if kind == "database" and options["slot"] is None and is_postgresql_url(url):
        options["slot"] = default_slot(name)  # per pipeline: two pipelines may read one table
    supervision = Supervision(**{key: float(values[key]) for key in Supervision.__dataclass_fields__
                                 if key in values})
    if supervision.restart_max_delay < supervision.restart_delay:
        key = "restart_max_delay" if "restart_max_delay" in values else "restart_delay"
        raise LocatedError(f"restart_max_delay ({supervision.restart_max_delay:g} s) is shorter"
                           f" than restart_delay ({supervision.restart_delay:g} s)", origins[key])
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
    except LocatedError:
        raise
    except ConfigurationError as exc:
        blamed = key or (exc.option if isinstance(exc, OptionError) else None)
        config_key = {"fmt": "format"}.get(blamed or "", blamed)
        path = origins.get(config_key or "", default)
        raise LocatedError(exc.message, path) from exc


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
                raise LocatedError(f"slot {options['slot']} is also pipeline {other}'s: two feeds"
                                   " cannot share a slot; name another slot", spec.origins[key])
        if options["checkpoint"]:
            other = checkpoints.setdefault(os.path.abspath(options["checkpoint"]), name)
            if other != name:
                raise LocatedError(f"pipeline {other} keeps its checkpoint in the same file",
                                   spec.origins["checkpoint"])


def _database_of(url: str) -> str:
    """What tells two PostgreSQL databases apart in a URL: host, port, database name."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
    except Exception:  # checked and reported with the pipeline's other options
        return url
    return f"{params.get('host')}:{params.get('port')}/{params.get('dbname')}"


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


__all__ = ["check_tables", "default_slot", "load_config"]
