"""No secret of a URL ever reaches stdout or stderr: ``changefeed run`` as a real process, on a
real PostgreSQL (its URL with a password too), delivering to real failing servers."""

from __future__ import annotations

import pytest
from clitools import assert_one_clear_line, run_cli, start_cli
from testservers import Receiver, refused_port

from changefeed.delivery import STOP_GRACE

pytestmark = pytest.mark.postgres

PG_SECRET = "pgs3cretpw"


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, title text)")
    pg.execute("INSERT INTO tasks VALUES (1, 'x')")  # --prefeed snapshot delivers it at once
    return pg


def with_password(dsn: str) -> str:
    """``dsn`` with a password (the test server trusts loopback, so any password works)."""
    return dsn.replace("postgres@", f"postgres:{PG_SECRET}@", 1)


# (sink spec with {port}, the secrets in it). The receiver listens on IPv6 for the [::1] form.
HTTP_SHAPES = [
    ("http://alice:pa55word@127.0.0.1:{port}/hook", ["alice", "pa55word"]),
    ("http://tok3nabc@127.0.0.1:{port}/hook", ["tok3nabc"]),
    ("http://127.0.0.1:{port}/hook?token=t0ps3cret", ["t0ps3cret"]),
    ("http://127.0.0.1:{port}/hook?a=1&key=k3yval", ["k3yval"]),
    ("http://[::1]:{port}/hook?key=v6secret", ["v6secret"]),
    ("snorky+http://127.0.0.1:{port}/backend?service=datasync&key=sn0rkykey", ["sn0rkykey"]),
]
RETRIED_SHAPES = HTTP_SHAPES
TLS_SHAPE = ("https://bob:httpspw@127.0.0.1:{port}/hook?token=tls5ecret",
             ["bob", "httpspw", "tls5ecret"])
"""TLS against a plain HTTP server: a handshake that can never succeed, failed at once."""


def receiver_for(spec: str, status: int) -> Receiver:
    return Receiver(fail_first=10**9, fail_status=status,
                    host="::1" if "[::1]" in spec else "127.0.0.1").start()


def shown_url(spec: str) -> str:
    """What an error names of ``spec``: its start, credentials masked (a Snorky sink's key is
    taken out of its URL, so nothing is left to mask there)."""
    if spec.startswith("snorky+"):
        return spec.removeprefix("snorky+").partition("?")[0]
    scheme, _, rest = spec.partition("://")
    rest, question, _ = rest.partition("?")
    shown = f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else f"{scheme}://{rest}"
    return shown + ("?***" if question else "")


def assert_no_secret(text: str, secrets: list[str]) -> None:
    for secret in [*secrets, PG_SECRET]:
        assert secret not in text, f"{secret!r} was printed:\n{text}"


@pytest.mark.parametrize("spec, secrets", RETRIED_SHAPES, ids=[s for s, _ in RETRIED_SHAPES])
def test_retry_warnings_and_stopping_show_no_secret(pg_dsn, tasks, spec, secrets):
    receiver = receiver_for(spec, 503)
    sink = spec.format(port=receiver.server_address[1])
    try:
        with start_cli("run", "tasks", "--url", with_password(pg_dsn), "--prefeed", "snapshot",
                       "--sink", sink) as run:
            run.wait_for_stderr("retrying in", count=2)
            _, out = run.stop(timeout=STOP_GRACE + 12)
    finally:
        receiver.stop()
    assert run.process.returncode == 0, run.stderr
    assert shown_url(sink) in run.stderr  # the URL is named, without its secrets
    assert_no_secret(out + run.stderr, secrets)


@pytest.mark.parametrize("spec, secrets", HTTP_SHAPES, ids=[s for s, _ in HTTP_SHAPES])
def test_the_error_line_of_a_refused_batch_shows_no_secret(pg_dsn, tasks, spec, secrets):
    receiver = receiver_for(spec, 400)
    try:
        result = run_cli("run", "tasks", "--url", with_password(pg_dsn), "--prefeed", "snapshot",
                         "--sink", spec.format(port=receiver.server_address[1]))
    finally:
        receiver.stop()
    assert_one_clear_line(result, shown_url(spec.format(port=receiver.server_address[1])))
    assert result.returncode == 5
    assert_no_secret(result.stdout + result.stderr, secrets)


def test_a_failed_tls_handshake_is_one_line_without_secrets(pg_dsn, tasks):
    spec, secrets = TLS_SHAPE
    receiver = receiver_for(spec, 200)
    sink = spec.format(port=receiver.server_address[1])
    try:
        result = run_cli("run", "tasks", "--url", with_password(pg_dsn), "--prefeed", "snapshot",
                         "--sink", sink)
    finally:
        receiver.stop()
    assert_one_clear_line(result, shown_url(sink), "TLS handshake failed")
    assert result.returncode == 5 and "retrying" not in result.stderr
    assert_no_secret(result.stdout + result.stderr, secrets)


def test_a_refused_redis_connection_is_retried_and_shows_no_secret(pg_dsn, tasks):
    spec = f"redis://:r3dispass@127.0.0.1:{refused_port()}/0?stream=s"
    with start_cli("run", "tasks", "--url", with_password(pg_dsn), "--prefeed", "snapshot",
                   "--sink", spec) as run:
        run.wait_for_stderr("retrying in", count=2)  # before, the run ended at once
        _, out = run.stop(timeout=STOP_GRACE + 12)
    assert run.process.returncode == 0, run.stderr
    assert "redis://***@127.0.0.1" in run.stderr
    assert_no_secret(out + run.stderr, ["r3dispass", "stream=s"])


@pytest.mark.parametrize("url_of, fragment", [
    (lambda dsn: with_password(dsn), "table 'nope' does not exist"),
    (lambda dsn: f"postgresql://postgres:{PG_SECRET}@127.0.0.1:{refused_port()}/db",
     "cannot connect to PostgreSQL"),
    (lambda dsn: f"postgresql://postgres:{PG_SECRET}@[::1/db", "bad PostgreSQL URL"),
    (lambda dsn: f"postgresql://postgres:{PG_SECRET}@127.0.0.1/db?nosuch=1",
     "bad PostgreSQL URL"),
    (lambda dsn: f"host=127.0.0.1 port={refused_port()} password={PG_SECRET} dbname=db",
     "cannot connect to PostgreSQL"),
], ids=["unknown-table", "unreachable", "malformed", "unknown-option", "conninfo"])
def test_a_postgresql_password_is_never_printed(pg_dsn, url_of, fragment):
    result = run_cli("run", "nope", "--url", url_of(pg_dsn))
    assert_one_clear_line(result, fragment)
    assert_no_secret(result.stdout + result.stderr, [])
