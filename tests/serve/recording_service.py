"""A service for testing the server's plumbing (no database): it records what the server asks
of it in a file, one word per line, and serves ``GET /recording`` with that file's lines."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from changefeed.errors import ConfigurationError
from changefeed.serve import Health, ServeContext, Service


class RecordingService(Service):
    def __init__(self, path: Path, name: str = "recording", fail_start: bool = False,
                 ready: bool = True, alive: bool = True) -> None:
        self.path = Path(path)
        self.name = name
        self.fail_start = fail_start
        self.ready = ready
        self.alive = alive
        self.context: ServeContext | None = None

    def record(self, word: str) -> None:
        with self.path.open("a") as file:
            file.write(f"{self.name} {word}\n")

    def routes(self) -> list:
        async def recording(request: Request) -> Response:
            return JSONResponse(self.path.read_text().splitlines())

        async def wait_for_stop(request: Request) -> Response:
            assert self.context is not None
            self.record("long-poll-waiting")
            await self.context.stopping.wait()  # a long poll, ended by the server stopping
            self.record("long-poll-ended")
            return JSONResponse({"ended": True})

        return [Route(f"/{self.name}/recording", recording),
                Route(f"/{self.name}/long-poll", wait_for_stop)]

    async def start(self, context: ServeContext) -> None:
        self.context = context
        Counter(f"{self.name}_starts", "Starts of the recording service",
                registry=context.registry).inc()
        self.record("start")
        if self.fail_start:
            raise ConfigurationError(f"{self.name} refuses to start")

    async def stop(self) -> None:
        stopping = self.context is not None and self.context.stopping.is_set()
        self.record("stop-after-stopping" if stopping else "stop")
        await asyncio.sleep(0)

    async def reload(self) -> None:
        self.record("reload")

    def health(self) -> Health:
        return Health(alive=self.alive, ready=self.ready, details={"state": "recording"})


if __name__ == "__main__":
    # python recording_service.py FILE PORT [NAME[:fail] ...]: run the server with these services
    from changefeed.cli.common import expected_errors, setup_logging
    from changefeed.serve.server import run_server

    setup_logging(False)
    path, port, *names = sys.argv[1:]
    services = [RecordingService(Path(path), name.partition(":")[0],
                                 fail_start=name.endswith(":fail"))
                for name in names or ["recording"]]
    try:
        with expected_errors():
            run_server(services, port=int(port))
    except Exception as exc:  # as the CLI shows it: one line and the exit code
        print(f"changefeed: error: {exc}", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
