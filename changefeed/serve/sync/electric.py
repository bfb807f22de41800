"""``GET /v1/shape``: Electric's HTTP shape API, so ``@electric-sql/client`` syncs unchanged.

``offset=-1`` answers the shape's rows at one log offset as inserts (``offset=now`` skips them);
``offset=<seq>_0`` with the ``handle`` the shape's changes after it, in log order, up to
`Settings.chunk_messages` a response, ``up-to-date`` at the head; ``live=true`` holds the
request until the shape changes, ``live_sse=true`` streams Server-Sent Events. Values are
PostgreSQL's text (``electric-schema`` gives the types). When a must-refetch is sent, and why
responses may be cached: ARCHITECTURE.md, "Handles and must-refetch"."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from changefeed.serve.sync.application import Forbidden, Unauthorized
from changefeed.serve.sync.core import NotServed, SyncCore, preflight
from changefeed.serve.sync.electric_messages import (
    BadRequest,
    Messages,
    offset_text,
    parse_offset,
)
from changefeed.serve.sync.shapes import Shape, ShapeError, parse_columns
from changefeed.serve.sync.tail import tables_loaded

UP_TO_DATE = b'{"headers":{"control":"up-to-date"}}'
MUST_REFETCH = b'[{"headers":{"control":"must-refetch"}}]'
EXPOSED = ("electric-handle, electric-offset, electric-schema, electric-cursor,"
           " electric-up-to-date, etag")


def _error(status: int, message: str, extra: dict[str, str] | None = None) -> Response:
    headers = {"cache-control": "no-store", "access-control-allow-origin": "*"}
    if extra:
        headers.update(extra)
    return Response(orjson.dumps({"message": message}), status_code=status, headers=headers,
                    media_type="application/json")


class ShapeApi:
    """The ``/v1/shape`` route over a `SyncCore` (see the module's notes)."""

    def __init__(self, core: SyncCore) -> None:
        self.core = core
        self._messages: OrderedDict[str, Messages] = OrderedDict()
        self._memo: OrderedDict[tuple, tuple[list[bytes], int]] = OrderedDict()
        self._frames_memo: OrderedDict[tuple, bytes] = OrderedDict()
        self._snapshots: dict[str, tuple[float, asyncio.Future[tuple[int, list[bytes]]]]] = {}


    def routes(self) -> list[Route]:
        return [Route("/v1/shape", self.endpoint, methods=["GET", "OPTIONS"])]

    # -- the request ---------------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return preflight("GET, OPTIONS", "authorization, content-type")
        core = self.core
        try:
            owner = await core.app.owner(_bearer(request))
        except Unauthorized as exc:
            return _error(401, str(exc), {"www-authenticate": "Bearer"})
        except Forbidden as exc:
            return _error(403, str(exc))
        query = request.query_params
        try:
            if any(name.startswith("subset__") for name in query):
                raise BadRequest("subset snapshots are not supported by this server")
            table = core.table(query.get("table", ""))
            columns = (parse_columns(query["columns"], table) if query.get("columns")
                       else None)
            params = {name[len("params["):-1]: value for name, value in query.multi_items()
                      if name.startswith("params[") and name.endswith("]")}
            shape = core.shape(table, query.get("where"), params, columns,
                               query.get("replica") or "default", owner)
            offset = parse_offset(query.get("offset"))
            live = _flag(query.get("live"))
            sse = live and (_flag(query.get("live_sse")) or _flag(query.get(
                "experimental_live_sse")))
            mode = query.get("log") or "full"
            if mode not in ("full", "changes_only"):
                raise BadRequest(f"log must be full or changes_only, not {mode!r}")
            handle = query.get("handle")
            if offset not in ("-1", "now") and not handle:
                raise BadRequest("handle is required with an offset other than -1 and now")
        except (ShapeError, BadRequest) as exc:
            return _error(400, str(exc))
        except NotServed as exc:
            return _error(403, str(exc))
        if not await self._loaded(table.qualified):
            return _error(503, f"table {table.qualified} is still being loaded: try again",
                          {"retry-after": "5"})
        headers = self._headers(shape, request)
        if offset == "-1" and mode == "full":
            return await self._initial(shape, headers)
        if offset in ("-1", "now"):
            head = core.reader.head
            return self._response([], head, True, headers, schema=shape, cache="initial")
        assert isinstance(offset, int)
        refetch = await self._refetch(shape, handle or "", offset)
        if refetch is not None:
            return refetch
        if offset < (core.reader.state.log_horizon if core.reader.state else 0):
            return await self._difference(shape, offset, headers)
        if sse:
            return self._sse(shape, offset, headers, query.get("cursor"))
        if live:
            messages, end = await self._live(shape, offset)
            headers["electric-cursor"] = _cursor(query.get("cursor"))
            return self._response(messages, end, True, headers, cache="live",
                                  start=offset)
        messages, end, complete = await self._catch_up(shape, offset)
        response = self._response(messages, end, complete, headers, schema=shape,
                                  cache="catch-up", start=offset)
        if request.headers.get("if-none-match") == response.headers["etag"]:
            return Response(status_code=304, headers={
                name: value for name, value in response.headers.items()
                if name not in ("content-length", "content-type")})
        return response

    async def _loaded(self, table: str) -> bool:
        reader = self.core.reader
        deadline = time.monotonic() + 30
        while not tables_loaded(reader.state, [table]):
            if time.monotonic() > deadline or self.core.stopping:
                return False
            await reader.wait_for_change(1.0)
        return True

    async def _refetch(self, shape: Shape, handle: str, offset: int) -> Response | None:
        """The 409 that tells the client to start again, when (and only when) its offset cannot
        be served for this shape."""
        core = self.core
        servable = core.handle_matches(shape, handle) and offset >= core.floor(shape)
        if servable and (offset <= core.reader.head
                         or await core.reader.wait_for_head(offset, 10.0)):
            return None
        headers = {"electric-handle": core.handle(shape),
                   "cache-control": "public, max-age=60, must-revalidate",
                   "access-control-allow-origin": "*",
                   "access-control-expose-headers": EXPOSED}
        return Response(MUST_REFETCH, status_code=409, headers=headers,
                        media_type="application/json")

    # -- reading ------------------------------------------------------------------------------

    def messages_for(self, shape: Shape) -> Messages:
        messages = self._messages.get(shape.digest)
        if messages is None:
            messages = self._messages[shape.digest] = Messages(shape)
            if len(self._messages) > 4096:
                self._messages.popitem(last=False)
        return messages

    async def _collect(self, shape: Shape, offset: int) -> tuple[list[bytes], int]:
        """The shape's messages after ``offset`` (at most a chunk) and the offset reached.
        Clients of one shape at one offset share the work (memo by digest, offset, head)."""
        reader = self.core.reader
        memo_key = (shape.digest, offset, reader.head)
        found = self._memo.get(memo_key)
        if found is not None:
            return found
        formatter = self.messages_for(shape)
        limit = self.core.settings.chunk_messages
        messages: list[bytes] = []
        reached = offset
        while len(messages) < limit:
            entries, end = await reader.entries_after(shape.table.qualified, reached, limit)
            for entry in entries:
                message = formatter.of_entry(entry)
                if message is not None:
                    messages.append(message)
            if end <= reached:
                break
            reached = end
            if end >= reader.head:
                break
        result = (messages, reached)
        self._memo[memo_key] = result
        if len(self._memo) > 2048:
            self._memo.popitem(last=False)
        return result

    async def _frames(self, shape: Shape, offset: int) -> tuple[bytes, int]:
        """The SSE frames of `_collect`'s messages, an ``up-to-date`` after them; made once
        for all the streams of one shape at one offset."""
        messages, reached = await self._collect(shape, offset)
        if not messages:
            return b"", reached
        key = ("sse", shape.digest, offset, reached)
        frames = self._frames_memo.get(key)
        if frames is None:
            control = orjson.dumps({"headers": {
                "control": "up-to-date", "global_last_seen_lsn": str(reached)}})
            frames = b"".join(b"data: " + m + b"\n\n" for m in messages) + (
                b"data: " + control + b"\n\n")
            self._frames_memo[key] = frames
            if len(self._frames_memo) > 1024:
                self._frames_memo.popitem(last=False)
        return frames, reached

    async def _catch_up(self, shape: Shape, offset: int) -> tuple[list[bytes], int, bool]:
        messages, end = await self._collect(shape, offset)
        return messages, end, end >= self.core.reader.head

    async def _live(self, shape: Shape, offset: int) -> tuple[list[bytes], int]:
        core = self.core
        loop = asyncio.get_running_loop()
        deadline = loop.time() + core.settings.live_timeout
        while True:
            messages, end = await self._collect(shape, offset)
            if messages or core.stopping or loop.time() >= deadline:
                return messages, end
            offset = end
            await core.reader.wait_for_change(deadline - loop.time())

    async def _initial(self, shape: Shape, headers: dict[str, str]) -> Response:
        """The shape's rows at one offset: read once for all the clients that ask within
        `Settings.snapshot_reuse_seconds` (any recent offset is as good: they catch up)."""
        now = time.monotonic()
        cached = self._snapshots.get(shape.digest)
        if cached is None or now - cached[0] > self.core.settings.snapshot_reuse_seconds or (
                cached[1].done() and not cached[1].cancelled()
                and cached[1].exception() is not None):
            # A task of its own: a client that goes away does not cancel the others' read.
            future = asyncio.ensure_future(self._read_snapshot(shape))
            self._snapshots[shape.digest] = (now, future)
            for digest, (at, _) in list(self._snapshots.items()):
                if now - at > 60:
                    del self._snapshots[digest]
        else:
            future = cached[1]
        head, messages = await asyncio.shield(future)
        return self._response(messages, head, True, headers, schema=shape, cache="initial")

    async def _read_snapshot(self, shape: Shape) -> tuple[int, list[bytes]]:
        owner = None
        if shape.owner_column is not None and shape.owner_kind in ("int", "text", "uuid"):
            owner = (shape.owner_column, str(shape.owner))
        head, tables = await self.core.reader.snapshot([shape.table.qualified], owner)
        rows = tables[shape.table.qualified]
        formatter = self.messages_for(shape)
        messages = [m for _, row in rows if (m := formatter.of_row(row)) is not None]
        return head, messages

    async def _difference(self, shape: Shape, offset: int, headers: dict[str, str]) -> Response:
        """An offset older than the log's window: the keys changed since, as they are now."""
        table = shape.table.qualified
        head, tables = await self.core.reader.snapshot([table], changed_after=offset)
        rows = tables[table]
        formatter = self.messages_for(shape)
        messages = [m for key, row in rows if (m := formatter.of_difference(row, key))]
        return self._response(messages, head, True, headers, schema=shape, cache="catch-up",
                              start=offset)

    # -- responses ----------------------------------------------------------------------------

    def _headers(self, shape: Shape, request: Request) -> dict[str, str]:
        headers = {"electric-handle": self.core.handle(shape),
                   "access-control-allow-origin": "*",
                   "access-control-expose-headers": EXPOSED}
        if self.core.app.authenticates:
            headers["vary"] = "Authorization"
        return headers

    def _response(self, messages: list[bytes], end: int, up_to_date: bool,
                  headers: dict[str, str], *, schema: Shape | None = None, cache: str,
                  start: int | None = None) -> Response:
        headers = dict(headers)
        headers["electric-offset"] = offset_text(end)
        if schema is not None:
            headers["electric-schema"] = schema.table.electric_schema(schema.columns).decode()
        if up_to_date:
            headers["electric-up-to-date"] = ""
        visibility = "private" if self.core.app.authenticates else "public"
        headers["cache-control"] = {
            "initial": f"{visibility}, max-age=1, stale-while-revalidate=5",
            "catch-up": f"{visibility}, max-age=60, stale-while-revalidate=300",
            "live": f"{visibility}, max-age=5, stale-while-revalidate=5",
        }[cache]
        if start is not None:
            headers["etag"] = f'"{headers["electric-handle"]}:{start}:{end}"'
        parts = list(messages)
        if up_to_date:
            parts.append(UP_TO_DATE)
        body = b"[" + b",".join(parts) + b"]"
        return Response(body, headers=headers, media_type="application/json")

    def _sse(self, shape: Shape, offset: int, headers: dict[str, str],
             cursor: str | None) -> Response:
        core = self.core
        headers = dict(headers)
        headers["electric-offset"] = offset_text(offset)
        headers["electric-cursor"] = _cursor(cursor)
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"

        async def events() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            position = offset
            end_at = loop.time() + core.settings.sse_seconds
            keepalive = core.settings.keepalive_seconds
            last_sent = loop.time()
            while not core.stopping:
                frames, reached = await self._frames(shape, position)
                if frames:
                    yield frames
                    last_sent = loop.time()
                position = reached
                now = loop.time()
                if now >= end_at:
                    return
                if now - last_sent >= keepalive:
                    yield b": keep-alive\n\n"
                    last_sent = now
                if reached >= core.reader.head:
                    await core.reader.wait_for_change(
                        min(end_at - now, keepalive - (now - last_sent)))

        return StreamingResponse(events(), headers=headers, media_type="text/event-stream")


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1", "yes")


def _cursor(previous: str | None) -> str:
    """Electric's live cursor: a 20-second interval number, never the one the request sent, so
    a CDN that collapses live requests does not hand a client the answer it already had."""
    cursor = int(time.time() // 20)
    if previous is not None and previous == str(cursor):
        cursor += 1
    return str(cursor)


__all__ = ["Messages", "ShapeApi", "offset_text", "parse_offset"]
