"""Running the app: uvicorn on a socket bound first, signals handled as a service expects.

* The port is bound before any service starts, so "address in use" is one line and nothing
  has connected to a database yet.
* SIGTERM and SIGINT stop the server cleanly: `ServeContext.stopping` is set at once (long
  polls and event streams end), open requests get `GRACE_SECONDS` to finish, then the services
  stop (delivered, acknowledged) and the process exits 0. A second SIGINT skips the waiting.
* SIGHUP calls every service's ``reload()``, one reload at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn

from changefeed.errors import ChangefeedError, ConfigurationError, first_line
from changefeed.serve.app import StartupFailed, make_app
from changefeed.serve.service import Service

log = logging.getLogger("changefeed.serve")

GRACE_SECONDS = 10.0
"""How long a stopping server waits for open requests before it stops the services."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port), or `ConfigurationError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn with changefeed's signal handling (see the module's notes)."""

    def __init__(self, config: uvicorn.Config, services: Sequence[Service],
                 stopping: asyncio.Event) -> None:
        super().__init__(config)
        self.services = services
        self.stopping = stopping
        self.reload_lock: asyncio.Lock | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        self.reload_lock = asyncio.Lock()

        def stop(signum: int, frame: Any) -> None:
            if self.should_exit:
                if signum == signal.SIGINT:
                    self.force_exit = True
                return
            log.info("stopping: finishing open requests, then the services")
            self.should_exit = True
            loop.call_soon_threadsafe(self.stopping.set)

        def reload(signum: int, frame: Any) -> None:
            loop.call_soon_threadsafe(lambda: loop.create_task(self.reload()))

        handlers = {signal.SIGINT: stop, signal.SIGTERM: stop, signal.SIGHUP: reload}
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    async def reload(self) -> None:
        assert self.reload_lock is not None
        async with self.reload_lock:
            log.info("reloading (SIGHUP)")
            for service in self.services:
                try:
                    await service.reload()
                except Exception as exc:  # the running configuration stays
                    log.error("%s: reload failed, keeping what runs: %s", service.name,
                              first_line(exc))


def run_server(services: Sequence[Service], host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve ``services`` on ``host``:``port`` until SIGTERM or SIGINT (see the module's notes).

    Raises `ConfigurationError` when the port cannot be bound, and the error of a service that
    failed to start (after stopping those that had started): changefeed's own as it is, any
    other as a `ChangefeedError` naming the service."""
    sock = bind(host, port)
    app = make_app(services)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(GRACE_SECONDS), server_header=False,
    )
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # Startup failures are reported once, by us; uvicorn would print the traceback.
        logging.getLogger(name).handlers[:] = [logging.NullHandler()]
        logging.getLogger(name).propagate = False
    server = _Server(config, services, app.state.context.stopping)
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("serving on http://%s:%s (%s)", _url_host(bound_host), bound_port,
             ", ".join(service.name for service in services) or "no services")
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit after a failed startup
        pass
    finally:
        sock.close()
    failure: StartupFailed | None = app.state.startup_failure
    if failure is not None:
        cause = failure.cause
        if isinstance(cause, ChangefeedError):
            raise cause
        raise ChangefeedError(f"could not start {failure}") from cause
    log.info("stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["GRACE_SECONDS", "bind", "run_server"]
