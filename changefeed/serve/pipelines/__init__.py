"""``changefeed serve --config FILE``: the named pipelines of a TOML file, supervised.

`PipelinesService` is the `changefeed.serve.Service` that runs them: each pipeline in a process
of its own under a `supervisor.Supervisor` (restarts with backoff, a permanent failure marks
only that pipeline ``failed``); SIGHUP re-reads the file (`reload`): pipelines added start,
removed ones stop cleanly, changed (and failed) ones restart, the others keep streaming;
SIGTERM stops them all cleanly. ``/metrics`` shows `metrics.METRICS` per pipeline, ``/healthz``
and ``/readyz`` each pipeline's state (`metrics.details`).

The parts: `service` (the `PipelinesService`), `config` (the file, checked before anything
connects: read by `config_file` and `toml_lines`, keys in `keys`, results in `specs`), `build`
(a spec made into a feed and a pipeline), `worker` (a pipeline's process), `meters` (what it
measures), `supervisor`, `metrics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from changefeed.serve.pipelines.service import PipelinesService

__all__ = ["PipelinesService"]


def __getattr__(name: str) -> Any:
    # Imported on first use: a pipeline's own process imports `worker` and needs no HTTP stack.
    if name == "PipelinesService":
        from changefeed.serve.pipelines.service import PipelinesService

        return PipelinesService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
