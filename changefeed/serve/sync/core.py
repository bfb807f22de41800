"""What the shape API and the sync protocol share in one process: the served tables, the log
reader, the application, the owner rule, compiled shapes and handles.

A handle is ``<digest>-<epoch>-<floor>``: the shape's digest (its definition, see `Shape`), the
log's epoch, and the oldest offset the log could serve that shape from when the handle was
given. It is computed, not stored, so every ``serve`` process gives the same handle for the
same shape, and it stays valid across restarts and compaction: a request is served whenever its
digest and epoch match and its offset is still servable. The floor part makes the handle given
after a must-refetch differ from the one the client gave up (Electric's client treats a response
carrying the handle it was told to drop as a stale cache entry).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from changefeed.serve.sync.application import Application
from changefeed.serve.sync.shapes import Shape, ShapeError, parse_table
from changefeed.serve.sync.tail import LogReader
from changefeed.serve.sync.values import TableInfo


def preflight(methods: str, headers: str) -> Response:
    """The answer to a CORS preflight (``OPTIONS``): both APIs may be called from any origin,
    with ``methods`` and the request ``headers`` named, and browsers may cache that for a day."""
    return Response(status_code=204, headers={
        "access-control-allow-origin": "*",
        "access-control-allow-methods": methods,
        "access-control-allow-headers": headers,
        "access-control-max-age": "86400"})


class NotServed(Exception):
    """A table this server does not serve (refused: 403)."""


@dataclass
class Settings:
    """Timings and sizes of the sync service (the defaults suit production)."""

    live_timeout: float = 20.0
    """A live long-poll with nothing new answers up-to-date after this many seconds."""
    sse_seconds: float = 60.0
    """An SSE stream ends after this long (the client reconnects from its offset)."""
    keepalive_seconds: float = 21.0
    """An SSE stream with nothing to send writes a keep-alive comment this often."""
    chunk_messages: int = 5000
    """Messages per catch-up response at most (the client asks for the rest)."""
    snapshot_reuse_seconds: float = 2.0
    """A shape's snapshot is read once for all clients asking within this many seconds."""
    log_window: float = 24 * 3600.0
    """Log entries are kept change by change this long."""
    tombstone_window: float = 7 * 24 * 3600.0
    """Deleted keys (and remembered Mobync diff ids) are kept this long."""
    compact_interval: float = 300.0
    """How often the feeder compacts the log."""
    sync_wait_seconds: float = 10.0
    """``POST /sync`` waits this long for its own writes to reach the log."""


class SyncCore:
    """The served tables and everything requests need to read them."""

    def __init__(self, tables: Sequence[TableInfo], reader: LogReader, app: Application,
                 owner_column: str | None, settings: Settings) -> None:
        self.tables = {table.qualified: table for table in tables}
        self.reader = reader
        self.app = app
        self.owner_column = owner_column
        self.settings = settings
        self.stopping = False
        self._shapes: OrderedDict[tuple, Shape] = OrderedDict()

    def table(self, name: str) -> TableInfo:
        """The served table ``name`` (Electric's ``table`` parameter, or a Mobync model).
        Raises `ShapeError` when the name does not read as one, `NotServed` when it is not
        served."""
        schema, relname = parse_table(name)
        table = self.tables.get(f"{schema}.{relname}")
        if table is None:
            raise NotServed(f"table {schema}.{relname} is not served")
        return table

    def shape(self, table: TableInfo, where: str | None, params: Mapping[str, str],
              columns: tuple[str, ...] | None, replica: str, owner: Any) -> Shape:
        """The compiled shape (compiled once, then reused: a thousand clients of one shape
        cost one sqlglot parse)."""
        key = (table.qualified, table.signature, where, tuple(sorted(params.items())), columns,
               replica, owner)
        shape = self._shapes.get(key)
        if shape is not None:
            self._shapes.move_to_end(key)
            return shape
        shape = Shape(table, where, params, columns, replica,
                      self.owner_column if self.app.authenticates else None, owner)
        self._shapes[key] = shape
        if len(self._shapes) > 4096:
            self._shapes.popitem(last=False)
        return shape

    def floor(self, shape: Shape) -> int:
        """The oldest offset ``shape`` can be served from: the log's horizon for shapes kept
        to an owner (serving older offsets would name keys of rows that were never theirs),
        else the tombstones' horizon."""
        state = self.reader.state
        assert state is not None
        return state.log_horizon if shape.owner_column else state.tombstone_horizon

    def handle(self, shape: Shape) -> str:
        """The handle the log gives ``shape`` now."""
        state = self.reader.state
        assert state is not None
        return f"{shape.digest}-{state.epoch}-{self.floor(shape)}"

    def handle_matches(self, shape: Shape, handle: str) -> bool:
        """Whether ``handle`` was given for this shape in this log (any floor)."""
        state = self.reader.state
        assert state is not None
        parts = handle.split("-")
        return len(parts) == 3 and parts[0] == shape.digest and parts[1] == state.epoch


__all__ = ["NotServed", "Settings", "ShapeError", "SyncCore"]
