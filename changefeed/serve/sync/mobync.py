"""``POST /sync``: Mobync's sync protocol, with the writes made safe.

A request ``{auth_token, logical_clock, diffs}`` (each diff: type 0 create, 1 update, 2 delete
of a row of ``model``, a served table) is answered ``{success, message, logical_clock, diffs,
applied, rejected}``: every change of the device's rows after its clock, in log order, and which
diffs were applied or rejected (with one-line reasons). Diffs are applied in one transaction, a
savepoint each, at most once, only to the token's owner's rows (``--owner-column``); the clock
is the shape log's offset. ARCHITECTURE.md ("Mobync writes") says how."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
import psycopg
from psycopg import sql
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from changefeed.errors import first_line
from changefeed.formats.codec import dumps
from changefeed.serve.sync.application import Forbidden, Unauthorized
from changefeed.serve.sync.core import NotServed, SyncCore, preflight
from changefeed.serve.sync.log import fence_prefix
from changefeed.serve.sync.shapes import Shape, ShapeError, View
from changefeed.serve.sync.tail import Entry
from changefeed.serve.sync.values import TableInfo, to_pg_text, to_python

MAX_BODY = 16 * 1024 * 1024
CREATE, UPDATE, DELETE = 0, 1, 2
_TYPES = {"insert": CREATE, "update": UPDATE, "delete": DELETE}


class Malformed(Exception):
    """The body is not a sync request (400)."""


class Rejected(Exception):
    """One diff is refused: its message is the reason reported to the device."""


def _answer(status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> Response:
    headers = {"cache-control": "no-store", "access-control-allow-origin": "*"}
    headers.update(extra or {})
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def _failure(status: int, message: str, extra: dict[str, str] | None = None) -> Response:
    return _answer(status, {"success": False, "message": message}, extra)


def parse_request(body: bytes) -> tuple[Any, int, list[dict[str, Any]]]:
    """The token, clock and diffs of a request body (pure). Raises `Malformed`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Malformed(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Malformed("the body must be a JSON object {auth_token, logical_clock, diffs}")
    clock = data.get("logical_clock", 0)
    if isinstance(clock, bool) or not isinstance(clock, int) or clock < 0:
        raise Malformed(f"logical_clock must be an integer >= 0, not {clock!r}")
    diffs = data.get("diffs", [])
    if not isinstance(diffs, list):
        raise Malformed("diffs must be a list")
    return data.get("auth_token"), clock, [parse_diff(diff, index)
                                           for index, diff in enumerate(diffs)]


def parse_diff(diff: Any, index: int) -> dict[str, Any]:
    """One diff checked for shape, ``json_data`` as a dict (pure). Raises `Malformed`."""
    where = f"diffs[{index}]"
    if not isinstance(diff, dict):
        raise Malformed(f"{where} must be an object")
    identifier = diff.get("id")
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)) or (
            identifier == ""):
        raise Malformed(f"{where}.id must be a non-empty string")
    kind = diff.get("type")
    if isinstance(kind, str) and kind in _TYPES:
        kind = _TYPES[kind]
    if isinstance(kind, bool) or kind not in (CREATE, UPDATE, DELETE):
        raise Malformed(f"{where}.type must be 0 (create), 1 (update) or 2 (delete), not"
                        f" {diff.get('type')!r}")
    model = diff.get("model")
    if not isinstance(model, str) or not model:
        raise Malformed(f"{where}.model must name a table")
    data = diff.get("json_data")
    if isinstance(data, str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise Malformed(f"{where}.json_data is not JSON") from None
    if not isinstance(data, dict):
        raise Malformed(f"{where}.json_data must be a JSON object (or its text)")
    for name in ("logical_clock", "utc_timestamp"):
        value = diff.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise Malformed(f"{where}.{name} must be a number")
    return {**diff, "id": str(identifier), "type": kind, "json_data": data}


class SyncApi:
    """The ``/sync`` route over a `SyncCore` (see the module's notes)."""

    def __init__(self, core: SyncCore) -> None:
        self.core = core

    def routes(self) -> list[Route]:
        return [Route("/sync", self.endpoint, methods=["POST", "OPTIONS"])]

    async def endpoint(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return preflight("POST, OPTIONS", "content-type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return _failure(413, f"the body is larger than {MAX_BODY // (1024 * 1024)} MB")
        try:
            token, clock, diffs = parse_request(await request.body())
        except Malformed as exc:
            return _failure(400, str(exc))
        if token is not None and not isinstance(token, str):
            return _failure(400, "auth_token must be a string")
        core = self.core
        try:
            owner = await core.app.owner(token)
        except Unauthorized as exc:
            return _failure(401, str(exc))
        except Forbidden as exc:
            return _failure(403, str(exc))
        applied, rejected, xid = await self.apply(owner, diffs)
        if xid is not None:
            await core.reader.wait_for_xid(xid, core.settings.sync_wait_seconds)
        answer = await self.changes(owner, clock)
        if answer is None:
            return _answer(409, {
                "success": False, "logical_clock": 0, "diffs": [], "applied": applied,
                "rejected": rejected,
                "message": f"logical_clock {clock} is older than this server keeps (or from"
                           " another log): sync again from 0"})
        head, out = answer
        message = f"{len(applied)} applied, {len(rejected)} rejected, {len(out)} to apply"
        return _answer(200, {"success": True, "message": message, "logical_clock": head,
                             "diffs": out, "applied": applied, "rejected": rejected})

    # -- writes ------------------------------------------------------------------------------

    async def apply(self, owner: Any, diffs: list[dict[str, Any]]
                    ) -> tuple[list[str], list[dict[str, str]], int | None]:
        """Apply ``diffs`` in one transaction, a savepoint each; return the applied ids, the
        rejected ones with reasons, and the transaction id if anything was written."""
        applied: list[str] = []
        rejected: list[dict[str, str]] = []
        if not diffs:
            return applied, rejected, None
        wrote = False
        xid = None
        pool = self.core.reader.pool
        assert pool is not None
        async with pool.connection() as conn:
            async with conn.transaction():
                for diff in diffs:
                    try:
                        async with conn.transaction():
                            changed = await self._apply_one(conn, owner, diff)
                    except Rejected as exc:
                        rejected.append({"id": diff["id"], "reason": str(exc)})
                        continue
                    except psycopg.Error as exc:
                        rejected.append({"id": diff["id"], "reason": first_line(exc)})
                        continue
                    applied.append(diff["id"])
                    wrote = wrote or changed
                if wrote:  # the fence comes after every change: see log.fence_prefix
                    cursor = await conn.execute(
                        "SELECT pg_current_xact_id()::text,"
                        " pg_logical_emit_message(true, %s, pg_current_xact_id()::text)",
                        [fence_prefix(self.core.reader.schema)])
                    row = await cursor.fetchone()
                    assert row is not None
                    xid = int(row[0]) & 0xFFFFFFFF
        return applied, rejected, xid

    async def _apply_one(self, conn: psycopg.AsyncConnection, owner: Any,
                         diff: dict[str, Any]) -> bool:
        """Apply one diff (inside its savepoint); True if it wrote a row. Raises `Rejected`."""
        core = self.core
        s = sql.Identifier(core.reader.schema)
        cursor = await conn.execute(
            sql.SQL("INSERT INTO {}.diffs (owner, id) VALUES (%s, %s) ON CONFLICT DO NOTHING"
                    " RETURNING 1").format(s), ["" if owner is None else str(owner), diff["id"]])
        if await cursor.fetchone() is None:
            return False  # applied before: a retried request
        try:
            table = core.table(diff["model"])
        except (NotServed, ShapeError) as exc:
            raise Rejected(str(exc)) from None
        kind = diff["type"]
        data = dict(diff["json_data"])
        unknown = [name for name in data if name not in table.columns]
        if unknown:
            raise Rejected(f"{table.qualified} has no column {unknown[0]!r}")
        given_owner = diff.get("owner")
        if core.app.authenticates and given_owner not in (None, "") and (
                str(given_owner) != str(owner)):
            raise Rejected("the diff's owner is not the token's owner")
        owner_column = core.owner_column
        if owner_column is not None and owner is not None:
            column = table.columns[owner_column]
            mine = to_python(column.kind, owner, column.dims)
            if owner_column in data and to_python(column.kind, data[owner_column],
                                                  column.dims) != mine:
                raise Rejected("a row cannot be given to another owner" if kind != CREATE
                               else "a row cannot be created for another owner")
            if kind == CREATE:
                data[owner_column] = owner
        validation = {**diff, "json_data": data}
        if not await core.app.allows(kind, owner, validation):
            raise Rejected(f"refused by the application's {_VALIDATOR_NAMES[kind]}")
        try:
            statement, params = self._statement(table, kind, data, owner)
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        if statement is None:
            return False
        cursor = await conn.execute(statement, params)
        if kind != CREATE and await cursor.fetchone() is None:
            raise Rejected(f"no row of {table.qualified} with that key"
                           + (" is yours" if owner_column else ""))
        return kind != UPDATE or any(column not in table.key for column in data)

    def _statement(self, table: TableInfo, kind: int, data: dict[str, Any], owner: Any
                   ) -> tuple[sql.Composable | None, list[Any]]:
        """The SQL of one diff, every value as PostgreSQL text cast to its column's type."""
        name = sql.Identifier(table.schema, table.name)

        def value(column: str, raw: Any) -> tuple[sql.Composable, Any]:
            info = table.columns[column]
            try:
                text = to_pg_text(info, raw)
            except ValueError as exc:
                raise ValueError(f"{column}: {exc}") from None
            return sql.SQL("%s::{}").format(sql.SQL(info.sql_type)), text

        if kind == CREATE:
            columns = list(data)
            if not columns:
                return sql.SQL("INSERT INTO {} DEFAULT VALUES").format(name), []
            pairs = [value(c, data[c]) for c in columns]
            return sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                name, sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join(p[0] for p in pairs)), [p[1] for p in pairs]
        missing = [column for column in table.key if data.get(column) is None]
        if missing:
            raise ValueError(f"json_data lacks the key column {missing[0]!r}")
        conditions, params = [], []
        for column in table.key:
            placeholder, text = value(column, data[column])
            conditions.append(sql.SQL("{} = {}").format(sql.Identifier(column), placeholder))
            params.append(text)
        if self.core.owner_column is not None and owner is not None:
            placeholder, text = value(self.core.owner_column, owner)
            conditions.append(sql.SQL("{} = {}").format(
                sql.Identifier(self.core.owner_column), placeholder))
            params.append(text)
        where = sql.SQL(" AND ").join(conditions)
        if kind == DELETE:
            return sql.SQL("DELETE FROM {} WHERE {} RETURNING 1").format(name, where), params
        changes = [c for c in data if c not in table.key]
        if not changes:
            return sql.SQL("SELECT 1 FROM {} WHERE {}").format(name, where), params
        pairs = [value(c, data[c]) for c in changes]
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), p[0]) for c, p in zip(changes, pairs,
                                                                                  strict=True))
        return sql.SQL("UPDATE {} SET {} WHERE {} RETURNING 1").format(
            name, assignments, where), [p[1] for p in pairs] + params

    # -- reads ---------------------------------------------------------------------------------

    async def changes(self, owner: Any, clock: int) -> tuple[int, list[dict[str, Any]]] | None:
        """The device's diffs after ``clock`` and the clock they reach, or None when the log no
        longer holds that clock (the device must sync again from 0)."""
        core = self.core
        reader = core.reader
        state = reader.state
        assert state is not None
        shapes = {name: core.shape(table, None, {}, None, "default", owner)
                  for name, table in core.tables.items()}
        if clock == 0:
            return await self._rows(owner, shapes, None)
        if clock > reader.head and not await reader.wait_for_head(clock, 5.0):
            return None
        if clock < state.log_horizon:
            if core.owner_column is not None or clock < state.tombstone_horizon:
                return None
            return await self._rows(owner, shapes, clock)
        head = reader.head
        entries: list[Entry] = []
        for name in shapes:
            offset = clock
            while True:
                batch, reached = await reader.entries_after(name, offset, 10_000)
                entries.extend(entry for entry in batch if entry.seq <= head)
                if reached >= head or not batch:
                    break
                offset = reached
        entries.sort(key=lambda entry: entry.seq)
        out = []
        for entry in entries:
            shape = shapes[entry.table]
            view = shape.view(entry.op, entry.new, entry.old)
            if view is not None:
                out.append(self._diff(shape, view, entry.seq, entry.committed_at, owner))
        return head, out

    async def _rows(self, owner: Any, shapes: Mapping[str, Shape], changed_after: int | None
                    ) -> tuple[int, list[dict[str, Any]]]:
        """Every row of the device as creates (a fresh device), or, after a clock older than
        the log's window, each key changed since as it is now (create) or a delete."""
        prefilter = None
        if self.core.owner_column is not None and owner is not None:
            first = next(iter(shapes.values()), None)
            if first is not None and first.owner_kind in ("int", "text", "uuid"):
                prefilter = (self.core.owner_column, str(first.owner))
        head, tables = await self.core.reader.snapshot(list(shapes), prefilter, changed_after)
        out = []
        for name, rows in tables.items():
            shape = shapes[name]
            for key, row in rows:
                if shape.matches(row):
                    out.append(self._diff(shape, View("insert", row, None), head, None, owner))
                elif changed_after is not None:
                    out.append(self._diff(shape, View("delete", None, key), head, None, owner))
        return head, out

    def _diff(self, shape: Shape, view: View, seq: int, committed_at: Any,
              owner: Any) -> dict[str, Any]:
        table = shape.table
        kind = _TYPES[view.operation]
        if kind == DELETE:
            assert view.old is not None
            data = {column: view.old.get(column) for column in table.key}
        else:
            assert view.new is not None
            data = {column: view.new.get(column) for column in table.columns}
        stamp = (committed_at.timestamp() if committed_at is not None else time.time())
        return {"id": f"{self.core.reader.state.epoch}:{seq}:{table.qualified}"  # type: ignore[union-attr]
                      f":{_key_id(data, table)}",
                "owner": owner, "logical_clock": seq, "utc_timestamp": int(stamp * 1000),
                "type": kind, "model": table.display,
                "json_data": dumps(data).decode()}


_VALIDATOR_NAMES = {CREATE: "validate_create", UPDATE: "validate_update",
                    DELETE: "validate_delete"}


def _key_id(data: dict[str, Any], table: TableInfo) -> str:
    return ",".join(str(data.get(column)) for column in table.key)


__all__ = ["Malformed", "SyncApi", "parse_diff", "parse_request"]
