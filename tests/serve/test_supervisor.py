"""The supervisor with real pipeline processes and no server to reach: a source that cannot be
reached is retried with a growing backoff, a configuration that broke since it was checked fails
for good, and a stop ends either at once."""

from __future__ import annotations

import time
from pathlib import Path

from testservers import refused_port
from waiting import wait_until

from changefeed.serve.pipelines.specs import PipelineSpec, Supervision
from changefeed.serve.pipelines.supervisor import Supervisor


def spec(tmp_path: Path, url: str, **supervision: float) -> PipelineSpec:
    options = {
        "tables": [], "url": url, "ops": ["insert", "delete", "update"], "prefeed": None,
        "fmt": "change", "model": None, "exclude": [], "chunk_size": None, "slot": None,
        "publication": None, "checkpoint": None, "limit": None, "idle_timeout": None,
        "where": None, "filter": None, "stages": [], "sink": str(tmp_path / "out.jsonl"),
        "dead_letter": None, "processes": False, "messages": [], "quiet": True,
    }
    source = {"kind": "redis", "stream": "s", "group": "g", "consumer": "c"}
    return PipelineSpec("p", options, source, True, Supervision(**supervision))


def test_a_source_that_cannot_be_reached_is_retried_with_a_growing_backoff(tmp_path):
    supervisor = Supervisor(spec(tmp_path, f"redis://127.0.0.1:{refused_port()}/0",
                                 restart_delay=0.2, restart_max_delay=0.8))
    supervisor.start()
    try:
        wait_until(lambda: supervisor.snapshot().restarts >= 3, "three restarts")
        snap = supervisor.snapshot()
        assert snap.state in ("retrying", "starting")
        assert "ConnectionError: Error 111 connecting to 127.0.0.1" in snap.error
        assert supervisor.alive
    finally:
        started = time.monotonic()
        supervisor.stop()
    assert time.monotonic() - started < 10  # a stop during the backoff does not wait it out
    assert supervisor.snapshot().state == "stopped"


def test_a_configuration_that_broke_since_it_was_checked_fails_for_good(tmp_path):
    gone = tmp_path / "gone"
    broken = spec(gone, f"redis://127.0.0.1:{refused_port()}/0", restart_delay=0.1)
    supervisor = Supervisor(broken)  # its sink's directory does not exist (any more)
    supervisor.start()
    try:
        wait_until(lambda: supervisor.snapshot().state == "failed", "the failure")
        snap = supervisor.snapshot()
        assert "directory" in snap.error and str(gone) in snap.error
        time.sleep(0.5)  # time passes: a failed pipeline must not restart
        assert supervisor.snapshot().restarts == 0
    finally:
        supervisor.stop()
    assert supervisor.snapshot().state == "failed"


def test_a_disabled_pipeline_is_never_started(tmp_path):
    disabled = spec(tmp_path, "redis://127.0.0.1:1/0")
    supervisor = Supervisor(PipelineSpec(disabled.name, disabled.options, disabled.source,
                                         False, disabled.supervision))
    supervisor.start()
    supervisor.stop()
    assert supervisor.snapshot().state == "disabled" and supervisor.snapshot().pid is None
