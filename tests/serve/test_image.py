"""The container image (``.ci/Dockerfile``) and the ``changefeed`` service of docker-compose.yml.

There is no Docker engine here, so the image is never built. What it would run is checked
instead: the Dockerfile's and the compose file's settings against each other and the package,
and then the image's command, its config at the mount path and its health check run as
processes against real PostgreSQL and Redis servers.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
import yaml
from serving import Serve, jsonl

from changefeed.cli.common import LOG_FORMATS
from changefeed.serve.pipelines.config import load_config

ROOT = Path(__file__).parents[2]


def instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions of the final stage: (INSTRUCTION, arguments), lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
             for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, (name, _) in enumerate(found) if name == "FROM")
    return found[last_from:]


DOCKERFILE = ROOT / ".ci" / "Dockerfile"
FINAL = instructions(DOCKERFILE)
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICE = COMPOSE["services"]["changefeed"]


def one(name: str) -> str:
    (value,) = [args for instruction, args in FINAL if instruction == name]
    return value


def command() -> list[str]:
    """ENTRYPOINT + CMD, as the image runs them."""
    return json.loads(one("ENTRYPOINT")) + json.loads(one("CMD"))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def env_of_image() -> dict[str, str]:
    found = {}
    for instruction, args in FINAL:
        if instruction == "ENV":
            found.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return found


def test_a_slim_python_with_tomllib_and_a_user_that_is_not_root():
    base = one("FROM")
    match = re.fullmatch(r"python:3\.(\d+)-slim", base)
    assert match and int(match.group(1)) >= 11, base  # tomllib is in the standard library
    user = one("USER").split(":")[0]
    assert user not in ("root", "0")
    run = " ".join(args for instruction, args in FINAL if instruction == "RUN")
    created = re.search(rf"useradd [^&]*--uid (\d+)[^&]* {user}\b", run)
    assert created and int(created.group(1)) >= 1000, run
    assert one("WORKDIR") == f"/var/lib/{user}" and f"--home-dir /var/lib/{user}" in run


def test_the_package_and_every_extra_but_the_tests_are_installed():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = set(config["options.extras_require"]) - {"test"}
    text = DOCKERFILE.read_text()
    for installed in re.findall(r'changefeed\[([a-z,]+)\]|"\.\[([a-z,]+)\]"', text):
        listed = installed[0] or installed[1]
        assert set(listed.split(",")) == extras, listed
    copied = {source for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
              if "--from" not in line for source in line.split()[:-1]}
    folders = {line.split("=")[1].strip() for line in
               config["options"]["package_dir"].strip().splitlines()}
    assert folders | {"setup.cfg", "pyproject.toml", "README.md"} == copied
    assert all((ROOT / source).exists() for source in copied)


def test_the_entry_point_serves_the_config_at_the_mount_path_with_a_health_check_on_readyz():
    argv = command()
    assert argv[:2] == ["changefeed", "serve"]
    config, port = option(argv, "--config"), option(argv, "--port")
    assert config == "/etc/changefeed/changefeed.toml" and option(argv, "--host") == "0.0.0.0"
    assert one("EXPOSE") == port
    check = one("HEALTHCHECK")
    assert re.search(rf"CMD changefeed status --url http://127\.0\.0\.1:{port}\b", check)
    assert "|| exit 1" in check  # Docker reads 1 as unhealthy (status exits 3 when unreachable)
    assert env_of_image()["CHANGEFEED_LOG_FORMAT"] in LOG_FORMATS


def test_the_compose_service_builds_the_image_and_mounts_a_config_it_can_read(tmp_path):
    assert SERVICE["build"] == {"context": ".", "dockerfile": ".ci/Dockerfile"}
    config_path = option(command(), "--config")
    by_target = {}
    for volume in SERVICE["volumes"]:
        source, target = volume.split(":")[:2]
        by_target[target] = source
    assert config_path in by_target, by_target
    mounted = ROOT / by_target[config_path]
    assert mounted.is_file()
    assert by_target[one("WORKDIR")] in COMPOSE["volumes"]  # the state survives the container
    assert SERVICE["ports"] == [f"127.0.0.1:8081:{option(command(), '--port')}"]
    health = SERVICE["healthcheck"]["test"]
    assert health[0] == "CMD-SHELL" and health[1] == one("HEALTHCHECK").split("CMD ", 1)[1]
    assert SERVICE["profiles"] == ["service"]
    # Every variable the config needs is in the service's environment.
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", mounted.read_text()))
    assert needed and needed <= set(SERVICE["environment"])
    for depends in SERVICE["depends_on"]:
        assert depends in COMPOSE["services"]
    demo = COMPOSE["services"]["postgres"]["volumes"][0].split(":")[0]
    assert (ROOT / demo).is_file()
    here = tmp_path / "changefeed.toml"  # the image's WORKDIR is not on this machine
    here.write_text(mounted.read_text().replace(f"{one('WORKDIR')}/", f"{tmp_path}/"))
    config = load_config(here, {name: "postgresql://u@postgres/db" for name in needed})
    assert list(config.pipelines) == ["orders", "orders-stream"]


def as_run_here(argv: list[str], config: Path, port: int) -> list[str]:
    """The image's command for this machine: this interpreter, the config's copy, a free port."""
    argv = list(argv)
    argv[argv.index("--config") + 1] = str(config)
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    return [sys.executable, "-m", "changefeed", *argv[1:]]


@pytest.mark.postgres
@pytest.mark.redis
def test_what_the_image_runs_streams_the_mounted_config_and_its_health_check_follows(
        tmp_path, pg_dsn, redis_url):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute((ROOT / ".ci" / "compose-demo.sql").read_text())
    home = tmp_path / "var-lib-changefeed"  # the image's WORKDIR
    home.mkdir()
    mounted = ROOT / ".ci" / "changefeed.toml"
    config = tmp_path / "etc-changefeed" / Path(option(command(), "--config")).name
    config.parent.mkdir()
    redis_host = redis_url.removeprefix("redis://").split("/")[0]
    config.write_text(mounted.read_text().replace("/var/lib/changefeed", str(home))
                      .replace("redis:6379", redis_host))
    serve = Serve(config, env={**env_of_image(), **SERVICE["environment"],
                               "DATABASE_URL": pg_dsn})
    argv = as_run_here(command(), config, serve.port)
    health = one("HEALTHCHECK").split("CMD ", 1)[1].replace(
        f":{option(command(), '--port')}", f":{serve.port}")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def healthy() -> int:
        return subprocess.run(["sh", "-c", health], env={**serve.env, "PATH": path},
                              capture_output=True, timeout=60).returncode

    with open(serve.log_path, "wb") as log:
        serve.process = subprocess.Popen(argv, cwd=home, env=serve.env, stdout=log, stderr=log)
    try:
        serve.wait_ready()
        assert healthy() == 0
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO orders (customer, total) VALUES ('alan', 7)")
        serve.wait_until(lambda: len(jsonl(home / "orders.jsonl")) == 3, "the orders file")
        client = redis.Redis.from_url(redis_url)
        serve.wait_until(lambda: client.xlen("orders") == 1, "the stream")
        assert [d["data"]["customer"] for d in jsonl(home / "orders.jsonl")] == [
            "ada", "grace", "alan"]
        serve.process.send_signal(signal.SIGTERM)  # docker stop
        assert serve.process.wait(60) == 0
        assert healthy() == 1
        lines = [json.loads(line) for line in serve.log.splitlines()]  # the image's JSON logs
        assert {line["pipeline"] for line in lines} == {None, "orders", "orders-stream"}
        assert pg_dsn not in serve.log
    finally:
        if serve.process.poll() is None:
            serve.process.kill()
