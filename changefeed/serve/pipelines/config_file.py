"""The config file as read: TOML text, depth-checked and parsed, with each key's line for messages,
and ``${VAR}`` substitution from the environment.

``${VAR}`` and ``${VAR:-default}`` in any string take the environment's value (``$${`` is a
literal ``${``); those values are secrets from then on (`changefeed.redact.register_secret`).
A problem found later at a key path is a `LocatedError`; `ConfigFile.locate` turns its path into
``FILE:LINE: KEY`` for the one-line message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any

from changefeed.errors import ConfigurationError
from changefeed.redact import register_secret
from changefeed.serve.pipelines.toml_lines import Path, key_lines, keys_on_line, tomllib


class LocatedError(ConfigurationError):
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


@dataclass(frozen=True)
class ConfigFile:
    """A config file parsed: its name as given, its TOML data, and where each key is."""

    shown: str
    data: dict[str, Any]
    locate: Callable[[Path], str]
    """``path`` -> ``file:line: key`` (a key's own line, else its nearest parent's)."""


def read_config_file(path: str | os.PathLike[str]) -> ConfigFile:
    """Read and parse the TOML file at ``path``. Raises `ConfigurationError` with one line:
    ``FILE:LINE: KEY: problem`` (unreadable, not UTF-8, nested too deep, invalid TOML)."""
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
        for size in range(len(where), 0, -1):
            if where[:size] in lines:
                return f"{shown}:{lines[where[:size]]}: {dotted(where)}"
        return f"{shown}: {dotted(where)}"

    return ConfigFile(shown, data, locate)


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
    ``secrets``. Raises `LocatedError` for an unset variable or a malformed reference."""
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
            raise LocatedError("malformed ${...}: use ${NAME} or ${NAME:-default} (and $${ for a"
                               " literal ${)", path)
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                raise LocatedError(f"environment variable {name} is not set", path)
            found = default
        else:
            secrets.append(found)
            register_secret(found)
        return found

    return _VARIABLE.sub(replace, value)


__all__ = ["MAX_NESTING", "ConfigFile", "LocatedError", "dotted", "read_config_file",
           "substitute", "too_deep"]
