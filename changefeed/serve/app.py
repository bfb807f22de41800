"""The one HTTP app of ``changefeed serve``: the services' routes, health and metrics.

``GET /healthz`` answers 200 while every service is alive, ``GET /readyz`` 200 once every
service is ready (503 otherwise), both with a JSON body naming each service's state, which
``changefeed status`` prints; ``GET /`` is ``/healthz`` for load balancers that probe the root.
``GET /metrics`` is the Prometheus text format of the registry every service registers in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from changefeed.errors import first_line
from changefeed.serve.service import ServeContext, Service

log = logging.getLogger("changefeed.serve")


class StartupFailed(Exception):
    """A service failed to start; the server stops the others and exits with ``cause``."""

    def __init__(self, service: str, cause: BaseException) -> None:
        super().__init__(f"{service}: {first_line(cause)}")
        self.service = service
        self.cause = cause


def make_app(
    services: Sequence[Service], *, registry: CollectorRegistry | None = None
) -> Starlette:
    """The app serving ``services``: their routes, ``/``, ``/healthz``, ``/readyz``,
    ``/metrics``. The services start (in order) when the server starts and stop (in reverse
    order) when it stops; a service that fails to start stops those started before it, and
    `StartupFailed` is kept in ``app.state.startup_failure`` for the caller to report."""
    registry = registry if registry is not None else CollectorRegistry()
    context = ServeContext(registry=registry)

    def states(ready: bool) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {}
        ok = True
        for service in services:
            health = service.health()
            good = health.alive and (health.ready or not ready)
            ok = ok and good
            body[service.name] = {
                "alive": health.alive, "ready": health.ready, **health.details,
            }
        return ok, body

    async def healthz(request: Request) -> Response:
        ok, body = states(ready=False)
        return JSONResponse({"status": "ok" if ok else "failing", "services": body},
                            status_code=200 if ok else 503)

    async def readyz(request: Request) -> Response:
        ok, body = states(ready=True)
        return JSONResponse({"status": "ready" if ok else "not ready", "services": body},
                            status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started: list[Service] = []
        try:
            for service in services:
                try:
                    await service.start(context)
                except Exception as exc:
                    app.state.startup_failure = StartupFailed(service.name, exc)
                    log.debug("%s failed to start", service.name, exc_info=True)
                    raise app.state.startup_failure from exc
                started.append(service)
            yield
        finally:
            for service in reversed(started):
                try:
                    await service.stop()
                except Exception as exc:  # the others must still stop cleanly
                    log.error("%s did not stop cleanly: %s", service.name, first_line(exc))

    routes: list[BaseRoute] = [
        Route("/", healthz), Route("/healthz", healthz), Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    for service in services:
        routes.extend(service.routes())
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.startup_failure = None
    app.state.services = list(services)
    app.state.context = context
    return app


__all__ = ["StartupFailed", "make_app"]
