"""Where a PostgreSQL change sits in the stream: `PgPosition`. Pure, no I/O.

Several row changes share a commit LSN (resuming after "LSN > last" would lose rows), so a
position is the commit LSN of the change's transaction plus the change's index in it. Its text
is ``"0000000001A2B3C8:00000003"``: 16 upper-case hex digits of LSN, a colon, 8 of index. That
fixed width makes text order the numeric order, so positions compare as (LSN, index) in C.

`PgPosition` is a `str` holding that text: JSON lines, checkpoint files and Kafka or Redis
headers write it as they always did, with no encoder hook (a class of two numbers would cost a
``__json__`` call per change in every encoder that writes positions).
Positions are made here: `PgPosition(lsn, index)`, `PgPosition.parse` for text read back (a
checkpoint), and `TransactionPositions` for the stream, a change at a time.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["PgPosition", "TransactionPositions", "make_position", "parse_position"]

_TEXT = re.compile(r"([0-9A-Fa-f]{1,16})(?::([0-9A-Fa-f]{1,8}))?")
_MAX_LSN = 2**64 - 1
_MAX_INDEX = 2**32 - 1
_str_new = str.__new__


class PgPosition(str):
    """The position of the ``index``-th change of the transaction committed at ``lsn``.

    A str in the canonical text (see the module docstring), so equal to and ordered like that
    text; ``lsn`` and ``index`` give the numbers back.
    """

    __slots__ = ()

    def __new__(cls, lsn: int, index: int = 0) -> PgPosition:
        if not (0 <= lsn <= _MAX_LSN and 0 <= index <= _MAX_INDEX):
            raise ValueError(f"no PostgreSQL position has LSN {lsn} and index {index}")
        return _str_new(cls, f"{lsn:016X}:{index:08X}")

    @classmethod
    def parse(cls, text: str) -> PgPosition:
        """The position written as ``text`` (``LSN:INDEX`` in hex; ``LSN`` alone is index 0).
        Raises ValueError for anything else."""
        match = _TEXT.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not a PostgreSQL position: {text!r}")
        lsn, index = match.groups()
        return cls(int(lsn, 16), int(index or "0", 16))

    @classmethod
    def of(cls, value: Any) -> PgPosition | None:
        """``value`` as a position: itself, its parsed text, or None when it is not one (a
        caller's prefeed item, another backend's checkpoint)."""
        if value.__class__ is cls:
            return value
        try:
            return cls.parse(value)
        except ValueError:
            return None

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[str]]:
        return _restore, (str(self),)  # the text: unpickling parses nothing

    @property
    def lsn(self) -> int:
        """The commit LSN of the change's transaction."""
        return int(self[:16], 16)

    @property
    def index(self) -> int:
        """The change's index among its transaction's changes."""
        return int(self[17:], 16)


def _restore(text: str) -> PgPosition:
    """Unpickle a position (its text as pickled; no parsing)."""
    return _str_new(PgPosition, text)


_DIGITS = "0123456789ABCDEF"
_HEX2 = [high + low for high in _DIGITS for low in _DIGITS]
_HEX3 = tuple([digit + pair for digit in _DIGITS for pair in _HEX2])
"""``"000"`` to ``"FFF"``: index texts are put together from these, as formatting an int costs
most of what making a position does."""


class TransactionPositions:
    """The positions of one transaction's changes, in order (`begin` starts the next
    transaction's): the one place the stream's positions are made, a change at a time."""

    __slots__ = ("_prefix", "_below_4096", "_below_2_24", "count")

    def __init__(self, lsn: int = 0) -> None:
        self.begin(lsn)

    def begin(self, lsn: int) -> None:
        """A transaction committed at ``lsn`` starts: its changes count from 0."""
        prefix = self._prefix = f"{lsn:016X}:"
        self._below_4096 = prefix + "00000"  # then 3 hex digits
        self._below_2_24 = prefix + "00"  # then 3 + 3
        self.count = 0
        """How many positions the transaction gave (or skipped) so far."""

    def take(self) -> PgPosition:
        """The next change's position."""
        index = self.count
        self.count = index + 1
        if index < 0x1000:
            text = self._below_4096 + _HEX3[index]
        elif index < 0x1000000:
            text = self._below_2_24 + _HEX3[index >> 12] + _HEX3[index & 0xFFF]
        else:
            text = f"{self._prefix}{index:08X}"
        return _str_new(PgPosition, text)


def make_position(lsn: int, index: int) -> PgPosition:
    """The position of the ``index``-th change of the transaction committed at ``lsn``."""
    return PgPosition(lsn, index)


def parse_position(position: str) -> tuple[int, int]:
    """The (commit LSN, index) of a position's text."""
    parsed = PgPosition.parse(position)
    return parsed.lsn, parsed.index
