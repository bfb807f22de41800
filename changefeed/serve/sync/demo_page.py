"""The page of ``changefeed demo --web`` (``/demo``): a table syncing live, edited offline."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from changefeed.serve.service import Service


class DemoPage(Service):
    """Serves ``/demo``: ``static/demo.html``, which uses ``/static/changefeed-sync.js``."""

    name = "demo-page"

    def routes(self) -> list[BaseRoute]:
        page = resources.files("changefeed.serve.sync").joinpath("static/demo.html").read_text()

        async def demo(request: Request) -> Response:
            return HTMLResponse(page, headers={"cache-control": "no-cache"})

        return [Route("/demo", demo)]
