"""What a part of ``changefeed serve`` provides: routes, background work, health."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute


@dataclass
class Health:
    """A service's health: ``alive`` (the process should not be restarted), ``ready`` (it does
    its job: every enabled pipeline streaming, the sync feed caught up), and details for
    people and ``changefeed status`` (JSON values only)."""

    alive: bool = True
    ready: bool = True
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeContext:
    """What the server gives every service when it starts."""

    registry: CollectorRegistry
    """Register Prometheus metrics here; ``/metrics`` exposes this registry."""
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server begins to stop (SIGTERM), before it waits for open requests to end:
    long-polling and streaming responses end when they see it."""


class Service:
    """A part of ``changefeed serve``. Subclasses override what they need.

    Construction validates everything that can be checked without connecting (a bad option is a
    `changefeed.errors.ConfigurationError` before the server binds its port). `start` launches
    the background work and returns; `stop` ends it cleanly (delivered, acknowledged); both run
    on the server's event loop, so blocking work belongs in threads. `health` must be cheap and
    must not block: the health routes call it on the event loop.
    """

    name = "service"

    def routes(self) -> list[BaseRoute]:
        """The HTTP routes this service adds to the app."""
        return []

    async def start(self, context: ServeContext) -> None:
        """Start the background work; raise to make the server exit with that error."""

    async def stop(self) -> None:
        """Stop the background work cleanly: what was delivered is acknowledged."""

    async def reload(self) -> None:
        """SIGHUP: take up changed configuration without dropping work in flight."""

    def health(self) -> Health:
        """The service's health now."""
        return Health()
