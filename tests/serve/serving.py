"""``changefeed serve --config`` as a real process, for the serve tests.

Its stdout and stderr go to files (a long-running server must never block on a full pipe); every
wait is on a condition with a deadline that fails the test with what the server logged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from testservers import free_port
from waiting import wait_until

HERE = Path(__file__).parent


def stage_path() -> str:
    """PYTHONPATH with this directory first, for the ``example_stages`` module."""
    return os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])


class Serve:
    """One ``changefeed serve --config CONFIG`` process (started by `start`)."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.port = free_port()
        self.env = {**os.environ, "PYTHONPATH": stage_path(), **(env or {})}
        self.args = args
        self.log_path = config.with_suffix(f".{self.port}.log")
        self.out_path = config.with_suffix(f".{self.port}.out")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Serve:
        with open(self.log_path, "ab") as log, open(self.out_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "changefeed", "serve", "--config", str(self.config),
                 "--port", str(self.port), *self.args],
                stdout=out, stderr=log, env=self.env)
        return self

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def fail(self, what: str) -> AssertionError:
        code = self.process.poll() if self.process else None
        return AssertionError(f"{what} (exit code {code}); the server said:\n{self.log}")

    def wait_until(self, condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
        """`waiting.wait_until` while this server runs, failing with what it logged."""
        def ended() -> bool:
            return self.process is not None and self.process.poll() is not None

        return wait_until(condition, what, timeout, ended=ended, said=lambda: self.log, step=0.1)

    def get(self, path: str, timeout: float = 10) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as reply:
                body = reply.read().decode()
                status = reply.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read().decode(), exc.code
        return status, (json.loads(body) if path != "/metrics" else body)

    def answering(self) -> bool:
        try:
            return self.get("/healthz", timeout=2)[0] in (200, 503)
        except OSError:
            return False

    def pipelines(self) -> dict[str, dict[str, Any]]:
        """Each pipeline's health details (``/readyz``)."""
        return self.get("/readyz")[1]["services"]["pipelines"]["pipelines"]

    def state(self, name: str) -> str | None:
        try:
            return self.pipelines().get(name, {}).get("state")
        except OSError:
            return None

    def wait_state(self, name: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        self.wait_until(lambda: self.answering() and self.state(name) in states,
                        f"pipeline {name} to be {' or '.join(states)}", timeout)
        return self.pipelines()[name]

    def wait_ready(self, timeout: float = 90) -> None:
        self.wait_until(lambda: self.answering() and self.get("/readyz")[0] == 200,
                        "every pipeline to be ready", timeout)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of ``/metrics``: (name, labels) -> value, parsed by prometheus_client."""
        text = self.get("/metrics")[1]
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(value for (sample, have), value in self.metrics().items()
                   if sample == name and set(labels.items()) <= have)

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 90) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.fail("the server did not stop") from None


def jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def orders_config(folder: Path, pipelines: str, **defaults: object) -> Path:
    """``folder/changefeed.toml``: the ``orders`` table of ``$DATABASE_URL`` by default (with
    ``defaults``, numbers as they are), then the ``pipelines`` given as TOML."""
    lines = ['url = "${DATABASE_URL}"', 'tables = "orders"',
             *(f"{key} = {value}" for key, value in defaults.items())]
    config = folder / "changefeed.toml"
    config.write_text("\n[defaults]\n" + "\n".join(lines) + "\n" + pipelines)
    return config
