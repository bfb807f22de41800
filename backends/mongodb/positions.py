"""Resume tokens as positions, and where a change stream starts. Pure: no I/O.

A position is a resume token as JSON (``{"_data": "8265..."}``), so the checkpoint store can
keep it. Snapshot positions add ``"snapshot": n`` (and ``"done": true`` on the last document)
to the token of the stream the snapshot hands over to.

`where_to_start` is the one place that decides how a stream is opened: from "now" (optionally
after reading the snapshot), ``resume_after`` a token, or ``start_after`` the invalidate that
ended the previous stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from changefeed.change import Position
from changefeed.errors import ConfigurationError

_DESCRIPTIONS = {
    "": "from now",
    "resume_after": "after the saved resume token",
    "start_after": "after the end of its previous stream",
}


def token_position(token: Mapping[str, Any]) -> Position:
    """A resume token as a JSON-serialisable position (``{"_data": "8265..."}``)."""
    data = token.get("_data")
    if len(token) == 1 and isinstance(data, str):
        return {"_data": data}
    # Pre-4.2 tokens (BinData _data, _typeBits): keep them as canonical Extended JSON.
    from bson import json_util

    return {"ejson": json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS)}


def position_token(position: Mapping[str, Any]) -> dict[str, Any]:
    """The resume token of a position made by `token_position` (extra keys are dropped)."""
    if "ejson" in position:
        from bson import json_util

        return dict(json_util.loads(position["ejson"]))
    data = position.get("_data")
    if not isinstance(data, str):
        raise ConfigurationError(
            f"the checkpoint holds {position!r}, which is not a MongoDB resume token"
        )
    return {"_data": data}


def snapshot_position(opened_at: Mapping[str, Any], number: int, last: bool) -> Position:
    """The position of the ``number``-th snapshot document (from 1), read before the stream
    whose start position is ``opened_at`` (``{}`` when the server gave no token)."""
    position = {**opened_at, "snapshot": number}
    if last:
        position["done"] = True
    return position


def resume_options(token: Mapping[str, Any], start_after: Any = None) -> dict[str, Any]:
    """The watch() argument that resumes a stream after ``token``.

    A stream opened with ``start_after`` (after an invalidate) reports that token until it
    moves past it; resuming from it must use ``start_after`` again, since ``resume_after`` an
    invalidate fails.
    """
    kind = "start_after" if start_after is not None and token == start_after else "resume_after"
    return {kind: dict(token)}


@dataclass(frozen=True)
class Start:
    """Where a change stream starts: the watch() arguments that say so (none: from now), and
    whether the collection is read as a snapshot first."""

    watch: dict[str, Any] = field(default_factory=dict)
    snapshot: bool = False
    snapshot_again: bool = False
    """The snapshot is taken again because the last one was not completed."""

    @property
    def description(self) -> str:
        """For the log: "from now", "after the saved resume token", ..."""
        return _DESCRIPTIONS[next(iter(self.watch), "")]


def where_to_start(
    acknowledged: Position,
    *,
    latest: Mapping[str, Any] | None = None,
    yielded: Position = None,
    snapshot_prefeed: bool = False,
    feed_id: str = "the feed",
) -> Start:
    """Where a (re)opened stream starts.

    Args:
        acknowledged: the last acknowledged position (from the checkpoint store at first).
        latest: `resume_options` of the latest token the stream reported in this process,
            if any. It also covers events the server filtered out and idle periods, so it is
            used while everything yielded was acknowledged (``acknowledged == yielded``).
        yielded: the position of the last change handed out in this process.
        snapshot_prefeed: the feed was asked for a snapshot prefeed.
        feed_id: names the checkpoint in errors.

    A completed snapshot (``"done"``) is never read again; an unfinished one is, when the
    snapshot prefeed is asked for or when its position holds no token to resume from.
    """
    if latest is not None and acknowledged == yielded:
        return Start(dict(latest))
    if acknowledged is None:
        return Start(snapshot=snapshot_prefeed)
    if not isinstance(acknowledged, Mapping):
        raise ConfigurationError(
            f"the checkpoint of {feed_id} holds {acknowledged!r}, which is not a"
            " MongoDB resume token: delete it or give another feed name"
        )
    unfinished = "snapshot" in acknowledged and not acknowledged.get("done")
    if unfinished and (snapshot_prefeed or "_data" not in acknowledged):
        return Start(snapshot=True, snapshot_again=True)
    if "_data" not in acknowledged and "ejson" not in acknowledged:
        return Start(snapshot=snapshot_prefeed)
    return Start({"resume_after": position_token(acknowledged)})


__all__ = [
    "Start",
    "position_token",
    "resume_options",
    "snapshot_position",
    "token_position",
    "where_to_start",
]
