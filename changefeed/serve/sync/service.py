"""`SyncService`: the shape API, the sync protocol and the shape log, as a ``serve`` service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from prometheus_client import Gauge
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from changefeed.errors import ConfigurationError, first_line
from changefeed.preflight import check_postgresql_dsn
from changefeed.serve.service import Health, ServeContext, Service
from changefeed.serve.sync.application import Application
from changefeed.serve.sync.core import Settings, SyncCore
from changefeed.serve.sync.electric import ShapeApi
from changefeed.serve.sync.feeder import Feeder
from changefeed.serve.sync.log import DEFAULT_SCHEMA, prepare_schema, resolve_tables
from changefeed.serve.sync.mobync import SyncApi
from changefeed.serve.sync.tail import LogReader, tables_loaded

log = logging.getLogger("changefeed.serve.sync")

STARTUP_SECONDS = 60.0
"""How long `SyncService.start` waits for the feed to stream (or another process to feed)."""


class SyncService(Service):
    """Serves ``tables`` to app clients: ``GET /v1/shape`` (Electric), ``POST /sync`` (Mobync),
    ``/static/`` (the JavaScript client), fed by the shape log in PostgreSQL.

    Args:
        url: the PostgreSQL database of the tables (and of the shape log).
        tables: the tables served; every other is refused.
        app: the application (see `changefeed.serve.sync.application`).
        owner_column: keep every device to the rows whose column of this name is its owner.
        schema: where the shape log lives (one log, one feeder, per schema).
        settings: timings and sizes (tests shorten them).
        feed: False serves from the log without ever feeding it.
    """

    name = "sync"

    def __init__(self, url: str, tables: Sequence[str], app: Application | None = None,
                 owner_column: str | None = None, *, schema: str = DEFAULT_SCHEMA,
                 settings: Settings | None = None, feed: bool = True) -> None:
        if not tables:
            raise ConfigurationError("name at least one table to serve")
        self.url = url
        self.table_names = list(tables)
        self.app = app or Application()
        if owner_column is not None and not self.app.authenticates:
            raise ConfigurationError(
                "--owner-column needs --app with authenticate(token): the owner of a request"
                " is who its token is")
        self.owner_column = owner_column
        self.schema = schema
        self.settings = settings or Settings()
        self.feed = feed
        self.reader = LogReader(url, schema)
        self.core = SyncCore([], self.reader, self.app, owner_column, self.settings)
        self.shape_api = ShapeApi(self.core)
        self.sync_api = SyncApi(self.core)
        self.feeder: Feeder | None = None
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    def from_options(cls, *, url: str | None, tables: Sequence[str], app: str | None,
                     owner_column: str | None, **options: Any) -> SyncService:
        """The service ``changefeed serve`` makes from its options (checked before anything
        connects; errors are one line)."""
        if not url:
            raise ConfigurationError("--url (or $CHANGEFEED_URL) names the database of the"
                                     " tables to serve")
        check_postgresql_dsn(url)
        return cls(url, tables, Application.load(app), owner_column, **options)

    def routes(self) -> list[BaseRoute]:
        static = StaticFiles(packages=[("changefeed.serve.sync", "static")])
        return [*self.shape_api.routes(), *self.sync_api.routes(),
                Mount("/static", app=static, name="sync-static")]

    async def start(self, context: ServeContext) -> None:
        tables = await asyncio.to_thread(self._prepare)
        self.core.tables = {table.qualified: table for table in tables}
        await self.reader.start()
        head = Gauge("changefeed_sync_log_head", "The shape log's last offset",
                     registry=context.registry)
        head.set_function(lambda: self.reader.head)
        self._watch = asyncio.create_task(self._watch_stopping(context))
        if self.feed:
            self.feeder = Feeder(self.url, self.schema, tables,
                                 log_window=self.settings.log_window,
                                 tombstone_window=self.settings.tombstone_window,
                                 compact_interval=self.settings.compact_interval)
            self.feeder.start()
            state = await asyncio.to_thread(self.feeder.wait_settled, STARTUP_SECONDS)
            if state == "failed" and self.feeder.error is not None:
                error = self.feeder.error
                await self.stop()
                raise error
        log.info("serving %s to app clients (shape log %s%s)",
                 ", ".join(t.qualified for t in tables), self.schema,
                 f", owner column {self.owner_column}" if self.owner_column else "")

    def _prepare(self) -> list:
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                tables = resolve_tables(conn, self.table_names)
                if self.owner_column is not None:
                    for table in tables:
                        if self.owner_column not in table.columns:
                            raise ConfigurationError(
                                f"table {table.qualified} has no owner column"
                                f" {self.owner_column!r}")
                prepare_schema(conn, self.schema, tables)
                return tables
        except psycopg.OperationalError as exc:
            raise ConfigurationError(f"cannot connect to the database: {first_line(exc)}"
                                     ) from None

    async def _watch_stopping(self, context: ServeContext) -> None:
        await context.stopping.wait()
        self.core.stopping = True
        self.reader.wake()

    async def stop(self) -> None:
        self.core.stopping = True
        if self.feeder is not None:
            self.feeder.stop()
            await asyncio.to_thread(self.feeder.join, 30)
        if self._watch is not None:
            self._watch.cancel()
        await self.reader.close()

    def health(self) -> Health:
        feeder = self.feeder.state if self.feeder is not None else "off"
        loaded = tables_loaded(self.reader.state, list(self.core.tables))
        details = {"feeder": feeder, "log_head": self.reader.head,
                   "tables_loaded": loaded, "log_connected": self.reader.connected}
        if self.feeder is not None and self.feeder.error is not None:
            details["error"] = first_line(self.feeder.error)
        return Health(alive=feeder != "failed" or self.reader.connected,
                      ready=self.reader.connected and loaded and feeder != "failed",
                      details=details)


__all__ = ["Settings", "SyncService"]
