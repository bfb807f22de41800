"""`PipelinesService`: the `changefeed.serve.Service` of a config file's pipelines (see the
package's notes)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from changefeed.serve.pipelines.config import check_tables, load_config
from changefeed.serve.pipelines.metrics import PipelinesCollector, details
from changefeed.serve.pipelines.specs import ServeConfig
from changefeed.serve.pipelines.supervisor import READY_STATES, Supervisor
from changefeed.serve.service import Health, ServeContext, Service

log = logging.getLogger("changefeed.serve")


class PipelinesService(Service):
    """The pipelines of a config file (see the module's notes)."""

    name = "pipelines"

    def __init__(self, config: ServeConfig, *, log_format: str = "text",
                 quiet: bool = False) -> None:
        self.config = config
        self.log_format = log_format
        self.quiet = quiet
        self.supervisors: dict[str, Supervisor] = {}
        self.started = False

    @classmethod
    def from_file(cls, path: str, *, log_format: str = "text",
                  quiet: bool = False) -> PipelinesService:
        """The service of the config file at ``path``, checked (`load_config`, then the tables
        on each PostgreSQL database, creating nothing); raises
        `changefeed.errors.ConfigurationError`."""
        config = load_config(path)
        check_tables(config)
        return cls(config, log_format=log_format, quiet=quiet)

    def _supervisor(self, name: str) -> Supervisor:
        return Supervisor(self.config.pipelines[name], log_format=self.log_format,
                          quiet=self.quiet)

    async def start(self, context: ServeContext) -> None:
        context.registry.register(PipelinesCollector(self._snapshots))
        for name in self.config.pipelines:
            self.supervisors[name] = supervisor = self._supervisor(name)
            supervisor.start()
        self.started = True
        log.info("running %s", _names(self.supervisors) or "no pipeline")

    async def stop(self) -> None:
        await _stop_all(list(self.supervisors.values()))

    async def reload(self) -> None:
        """Read the file again; a file with a problem changes nothing (the problem is logged,
        one line, by the server)."""
        path = self.config.path
        new = await asyncio.to_thread(load_config, path)
        old = self.config.pipelines
        added = [name for name in new.pipelines if name not in old]
        removed = [name for name in old if name not in new.pipelines]
        # A failed pipeline starts again too: its cause may have been fixed outside the file.
        changed = [name for name in new.pipelines if name in old and (
            new.pipelines[name].fingerprint != old[name].fingerprint
            or self._failed(name))]
        await asyncio.to_thread(check_tables, new, added + changed)
        if not (added or removed or changed):
            log.info("reloaded %s: nothing changed", path)
            self.config = new
            return
        log.info("reloading %s: adding %s, removing %s, restarting %s", path,
                 _names(added) or "none", _names(removed) or "none", _names(changed) or "none")
        await _stop_all([self.supervisors[name] for name in removed + changed
                         if name in self.supervisors])
        for name in removed:
            self.supervisors.pop(name, None)
        self.config = new
        ordered: dict[str, Supervisor] = {}
        for name in new.pipelines:  # file order, for the metrics and health
            supervisor = self.supervisors.get(name)
            if supervisor is None or name in changed:
                supervisor = self._supervisor(name)
                supervisor.start()
            ordered[name] = supervisor
        self.supervisors = ordered

    def _failed(self, name: str) -> bool:
        supervisor = self.supervisors.get(name)
        return supervisor is not None and supervisor.snapshot().state == "failed"

    def _snapshots(self) -> list[Any]:
        return [supervisor.snapshot() for supervisor in list(self.supervisors.values())]

    def health(self) -> Health:
        snapshots = self._snapshots()
        alive = all(supervisor.alive for supervisor in list(self.supervisors.values()))
        ready = self.started and all(snap.state in READY_STATES for snap in snapshots)
        return Health(alive=alive, ready=ready,
                      details={"pipelines": {snap.name: details(snap) for snap in snapshots}})


async def _stop_all(supervisors: list[Supervisor]) -> None:
    """Stop ``supervisors`` at once (each pipeline delivers and acknowledges) and wait."""
    await asyncio.gather(*(asyncio.to_thread(supervisor.stop) for supervisor in supervisors))


def _names(names: Any) -> str:
    return ", ".join(names)


__all__ = ["PipelinesService"]
