"""`Message`: a logical decoding message, streamed next to the row changes.

PostgreSQL's ``pg_logical_emit_message(transactional, prefix, content)`` writes a message into
the WAL. A transactional message is part of its transaction: it arrives only if the transaction
commits, at its place among the transaction's row changes, and its ``position`` belongs to the
same sequence as theirs. A non-transactional message arrives as soon as it is written, whatever
becomes of the transaction around it, with a position of its own.

A `Message` is acknowledged like a `Change` (``feed.ack(message.position)``), so a consumer that
handles both does nothing special for either.

JSON content is read as json column values are (`changefeed.formats.json_values`): numbers
digit for digit, and content nested deeper than ``MAX_DEPTH`` containers (or escaping a lone
surrogate) kept as its exact text, which goes out as JSON, not as a string. No content can stop
a feed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from changefeed.change import Position
from changefeed.formats.json_values import loads_value


@dataclass(frozen=True, slots=True)
class Message:
    """A logical decoding message as committed (or, non-transactional, as written).

    ``content`` holds the bytes as sent; `text` and `json` read them. ``committed_at`` and
    ``transaction`` are those of the enclosing transaction, None for a non-transactional message.
    ``lsn`` is the WAL position PostgreSQL gives the message: where its record ends.
    """

    prefix: str
    content: bytes
    position: Position
    transactional: bool = True
    committed_at: datetime | None = None
    transaction: Any = None
    lsn: int | None = None

    @property
    def text(self) -> str:
        """The content as UTF-8 text (UnicodeDecodeError when it is not UTF-8)."""
        return self.content.decode("utf-8")

    def json(self) -> Any:
        """The content parsed as JSON, exactly: integers as ints, other numbers as
        `changefeed.formats.json_values.JsonDecimal`, content nested too deep for Python as
        its text (a ``RawJson``). ValueError when it is not JSON (UTF-8)."""
        return loads_value(self.content)

    def to_dict(self) -> dict[str, Any]:
        """The JSON line ``changefeed run --messages`` writes for this message.

        ``content`` is the parsed JSON when the content is JSON, else its text when it is UTF-8,
        else its base64 encoding, and then ``"content_encoding": "base64"`` says so.
        """
        result: dict[str, Any] = {"type": "message", "prefix": self.prefix}
        result.update(decode_content(self.content))
        result["position"] = self.position
        result["transactional"] = self.transactional
        if self.committed_at is not None:
            result["committed_at"] = self.committed_at
        return result


def decode_content(content: bytes) -> dict[str, Any]:
    """``{"content": value}``: JSON (exact, see `Message.json`), else text, else base64 (with
    ``content_encoding``)."""
    try:
        return {"content": loads_value(content)}
    except ValueError:
        pass
    try:
        return {"content": content.decode("utf-8")}
    except UnicodeDecodeError:
        return {"content": base64.b64encode(content).decode("ascii"),
                "content_encoding": "base64"}

