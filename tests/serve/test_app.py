"""The serve app without a server: routes, health, readiness, metrics, the services' lifespan."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from recording_service import RecordingService
from starlette.testclient import TestClient

from changefeed.serve.app import StartupFailed, make_app


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_services_start_in_order_and_stop_in_reverse(tmp_path: Path) -> None:
    log = tmp_path / "log"
    app = make_app([RecordingService(log, "a"), RecordingService(log, "b")])
    with TestClient(app) as client:
        assert client.get("/a/recording").json() == ["a start", "b start"]
    assert lines(log) == ["a start", "b start", "b stop", "a stop"]


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_service_failing_to_start_stops_those_before_it(tmp_path: Path, failing: int) -> None:
    log = tmp_path / "log"
    services = [RecordingService(log, name, fail_start=i == failing)
                for i, name in enumerate("abc")]
    app = make_app(services)
    with pytest.raises(StartupFailed) as raised, TestClient(app):
        pass
    started = [f"{name} start" for name in "abc"[: failing + 1]]
    stopped = [f"{name} stop" for name in reversed("abc"[:failing])]
    assert lines(log) == started + stopped
    assert raised.value.service == "abc"[failing]
    assert app.state.startup_failure is raised.value
    assert str(raised.value) == f"{'abc'[failing]}: {'abc'[failing]} refuses to start"


@pytest.mark.parametrize(
    ("alive", "ready", "healthz", "readyz"),
    [((True, True), (True, True), 200, 200),
     ((True, True), (True, False), 200, 503),
     ((False, True), (False, True), 503, 503),
     ((True, False), (True, True), 503, 503)],
)
def test_health_and_readiness_need_every_service(
    tmp_path: Path, alive: tuple[bool, bool], ready: tuple[bool, bool], healthz: int, readyz: int,
) -> None:
    services = [RecordingService(tmp_path / "log", name, alive=a, ready=r)
                for name, a, r in zip("ab", alive, ready, strict=True)]
    with TestClient(make_app(services)) as client:
        for path, expected in (("/healthz", healthz), ("/", healthz), ("/readyz", readyz)):
            response = client.get(path)
            assert response.status_code == expected, path
            body = response.json()
            assert body["services"] == {
                name: {"alive": a, "ready": r, "state": "recording"}
                for name, a, r in zip("ab", alive, ready, strict=True)
            }
        assert client.get("/healthz").json()["status"] == ("ok" if healthz == 200 else "failing")
        assert client.get("/readyz").json()["status"] == (
            "ready" if readyz == 200 else "not ready")


def test_metrics_expose_what_the_services_registered(tmp_path: Path) -> None:
    with TestClient(make_app([RecordingService(tmp_path / "log", "a"),
                              RecordingService(tmp_path / "log", "b")])) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {sample.name: sample.value
               for family in text_string_to_metric_families(response.text)
               for sample in family.samples}
    assert samples["a_starts_total"] == 1.0
    assert samples["b_starts_total"] == 1.0
