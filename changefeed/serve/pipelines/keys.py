"""The keys a pipeline of the config file takes (`PIPELINE_KEYS`), and the check of their types.

A pipeline takes the options of ``changefeed run`` as keys, and the keys of sources ``changefeed
run`` does not read: a Kafka topic or a Redis stream that a sink of another pipeline wrote.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from changefeed.bounds import count_problem, seconds_problem
from changefeed.serve.pipelines.config_file import LocatedError
from changefeed.serve.pipelines.toml_lines import Path

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


def _workers(value: Any) -> str | None:
    from changefeed.cli.pipeline_options import MAX_WORKERS, workers_count
    from changefeed.errors import ConfigurationError

    try:
        workers_count(value)
    except ConfigurationError:
        return f'must be a whole number from 1 to {MAX_WORKERS}, or "auto"'
    return None


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
    Key("workers", (int, str), 'an integer or "auto"', _workers),
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


def unknown(key: str, known: tuple[str, ...] | list[str], what: str) -> str:
    """The message for an unknown ``key``: the closest known name, else all of them."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
    return f"unknown {what}{hint}"


def check_keys(table: dict[str, Any], where: Path) -> None:
    """Every key of ``table`` (at ``where``) known, of a type it takes and a valid value;
    raises `LocatedError` at the first that is not."""
    for key, value in table.items():
        spec = PIPELINE_KEYS.get(key)
        if spec is None:
            known = [name for name in PIPELINE_KEYS if name not in OLD_NAMES]
            raise LocatedError(unknown(key, known, "key"), (*where, key))
        if isinstance(value, bool) and bool not in spec.kinds or not isinstance(value, spec.kinds):
            raise LocatedError(f"expected {spec.shown}, not {_describe(value)}", (*where, key))
        problem = spec.check(value) if spec.check is not None else None
        if problem is not None:
            raise LocatedError(problem, (*where, key))


def current_names(table: dict[str, Any], where: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """``table`` with its keys under their current names (`OLD_NAMES`), and where each key was
    written (for messages, which name the key as the file does)."""
    origins: dict[str, Path] = {key: (*where, key) for key in table}
    for old, new in OLD_NAMES.items():
        if old in table:
            if new in table:
                raise LocatedError(f"{old} is the old name of {new}: give one", (*where, old))
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


__all__ = ["DATABASE_ONLY", "NAME", "OLD_NAMES", "PIPELINE_KEYS", "READ_BACK_ONLY",
           "READ_BACK_SCHEMES", "TOP_KEYS", "Key", "check_keys", "current_names", "unknown"]
