"""Where each key of a TOML document is: ``tomllib`` parses values but keeps no positions.

`key_lines` scans the text once more for what an error message needs: the line on which every
key path is set (``("pipelines", "orders", "url")``), and every array item (``(..., "tables",
1)``). It follows TOML's lexical rules (comments, the four kinds of strings, arrays over several
lines, inline tables, dotted and quoted keys, table and array-of-tables headers) but decides
nothing: values come from ``tomllib``, which also decodes the quoted keys found here, so both
always agree on names. On text ``tomllib`` rejects it returns what it found before the problem.

    >>> key_lines('[pipelines.orders]\\nurl = "x"  # a comment\\ntables = [\\n  "a",\\n  "b"]\\n')
    {('pipelines',): 1, ('pipelines', 'orders'): 1, ('pipelines', 'orders', 'url'): 2, \
('pipelines', 'orders', 'tables'): 3, ('pipelines', 'orders', 'tables', 0): 4, \
('pipelines', 'orders', 'tables', 1): 5}
"""

from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

Path = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}#\n]")


class _Stop(Exception):
    """The text ends or breaks TOML's rules here: keep what was found so far."""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[Path, int] = {}
        self.seen: list[tuple[Path, int]] = []
        """Every key set, in order, repeated ones too (for `keys_on_line`)."""
        self.array_tables: dict[Path, int] = {}

    @property
    def line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def peek(self, count: int = 1) -> str:
        return self.text[self.pos:self.pos + count]

    def note(self, path: Path, line: int) -> None:
        for size in range(1, len(path)):  # parents a dotted key or header creates
            self.lines.setdefault(path[:size], line)
        self.lines.setdefault(path, line)
        self.seen.append((path, line))

    def skip_blank(self, newlines: bool = False) -> None:
        """Skip spaces and tabs (and newlines and comments with ``newlines``)."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif newlines and char == "#":
                self.skip_comment()
            else:
                return

    def skip_comment(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end

    def document(self) -> dict[Path, int]:
        table: Path = ()
        while True:
            self.skip_blank(newlines=True)
            if self.pos >= len(self.text):
                return self.lines
            line = self.line
            if self.peek(2) == "[[":
                self.pos += 2
                name = self.key()
                self.expect("]]")
                index = self.array_tables[name] = self.array_tables.get(name, -1) + 1
                table = (*name, index)
                self.note(name, line)
                self.note(table, line)
            elif self.peek() == "[":
                self.pos += 1
                table = self.key()
                self.expect("]")
                self.note(table, line)
            else:
                self.pair(table)
            self.skip_blank()
            if self.peek() == "#":
                self.skip_comment()

    def expect(self, token: str) -> None:
        self.skip_blank()
        if self.peek(len(token)) != token:
            raise _Stop
        self.pos += len(token)

    def key(self) -> tuple[str, ...]:
        """A dotted key, each part decoded as tomllib decodes it."""
        parts = []
        while True:
            self.skip_blank()
            char = self.peek()
            if char in ('"', "'"):
                start = self.pos
                self.string()
                raw = self.text[start:self.pos]
                try:
                    parts.append(next(iter(tomllib.loads(f"{raw} = 0"))))
                except tomllib.TOMLDecodeError:
                    raise _Stop from None
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if match is None:
                    raise _Stop
                parts.append(match.group())
                self.pos = match.end()
            self.skip_blank()
            if self.peek() != ".":
                return tuple(parts)
            self.pos += 1

    def pair(self, table: Path) -> None:
        line = self.line
        path = (*table, *self.key())
        self.expect("=")
        self.note(path, line)
        self.skip_blank()
        self.value(path)

    def value(self, path: Path) -> None:
        char = self.peek()
        if char in ('"', "'"):
            self.string()
        elif char == "[":
            self.array(path)
        elif char == "{":
            self.inline_table(path)
        else:
            match = _SCALAR_END.search(self.text, self.pos)
            end = len(self.text) if match is None else match.start()
            if end == self.pos:
                raise _Stop
            self.pos = end

    def string(self) -> None:
        quote = self.peek()
        if self.peek(3) == quote * 3:  # multi-line: ends at the first triple quote not escaped
            self.pos += 3
            while True:
                end = self.text.find(quote * 3, self.pos)
                if end < 0:
                    raise _Stop
                if quote == '"' and _escaped(self.text, end):
                    self.pos = end + 1
                    continue
                self.pos = end + 3
                while self.peek() == quote:  # up to two quotes may close the content
                    self.pos += 1
                return
        self.pos += 1
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise _Stop
            char = self.text[self.pos]
            if char == "\\" and quote == '"':
                self.pos += 2
                continue
            self.pos += 1
            if char == quote:
                return

    def array(self, path: Path) -> None:
        self.pos += 1
        index = 0
        while True:
            self.skip_blank(newlines=True)
            if self.peek() == "]":
                self.pos += 1
                return
            item = (*path, index)
            self.note(item, self.line)
            self.value(item)
            index += 1
            self.skip_blank(newlines=True)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise _Stop

    def inline_table(self, path: Path) -> None:
        self.pos += 1
        self.skip_blank()
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            self.pair(path)
            self.skip_blank()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() == "}":
                self.pos += 1
                return
            else:
                raise _Stop


def _escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` follows an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _scan(text: str) -> _Scanner:
    scanner = _Scanner(text)
    try:
        scanner.document()
    except _Stop:
        pass
    return scanner


def key_lines(text: str) -> dict[Path, int]:
    """The line where each key path (and array item) of the TOML ``text`` is set (first line 1);
    for text TOML rejects, what comes before the problem."""
    return _scan(text).lines


def keys_on_line(text: str, line: int) -> list[Path]:
    """The key paths set on ``line`` (a key set twice too), longest first: for an error that
    names only a line."""
    found = {path for path, where in _scan(text).seen if where == line}
    return sorted(found, key=len, reverse=True)


__all__ = ["Path", "key_lines", "keys_on_line"]
