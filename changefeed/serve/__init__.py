"""``changefeed serve``: one long-running process with one HTTP server.

The server hosts services. A service is a set of routes plus background work that starts and
stops with the server (`Service`): the pipelines of a config file for operators
(`changefeed.serve.pipelines`), and the shape API and sync protocol for app clients
(`changefeed.serve.sync`). The app (`app.make_app`) adds, over all of them, ``/healthz``
(alive), ``/readyz`` (every service ready) and ``/metrics`` (Prometheus);
`server.run_server` runs it until SIGTERM or SIGINT and passes SIGHUP on as a reload.

Everything here needs the ``serve`` extra (``pip install 'changefeed[serve]'``). The names are
imported on first use, so that a pipeline's own process (which needs none of the HTTP stack)
does not load Starlette.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from changefeed.serve.service import Health, ServeContext, Service

__all__ = ["Health", "ServeContext", "Service"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from changefeed.serve import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
