"""A throwaway local PostgreSQL cluster, for `changefeed demo`, the tests and the benchmarks.

`TemporaryPostgres` runs ``initdb`` in a temporary directory, starts the server on a free
loopback port with ``wal_level=logical``, and removes everything on exit. PostgreSQL refuses to
run as root, so when we are root the cluster belongs to an unprivileged user (``nobody`` unless
``CHANGEFEED_PG_USER`` names another) and the server runs as that user.

``pg_ctl`` detaches the server from us, so a process killed before its ``destroy()`` (``kill
-9``, a crash) would leave a server running and its directory behind forever. A guard (a small
Python process of its own session, `_GUARD`) holds the read end of a pipe whose write end only
we hold: its EOF, however we end, makes it stop the server and remove the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from changefeed.errors import ConfigurationError

_GUARD = """
import os, shutil, subprocess, sys
pg_ctl, datadir, directory, owner = sys.argv[1:5]
while os.read(0, 4096):  # nothing is written: only the EOF of the creator's end matters
    pass
if os.path.exists(os.path.join(datadir, "postmaster.pid")):
    uid, gid = (int(n) for n in owner.split(":")) if owner else (None, None)
    subprocess.run([pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop"], user=uid,
                   group=gid, extra_groups=[] if uid is not None else None,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(directory, ignore_errors=True)
"""
"""The guard: waits for the EOF of its stdin, then stops the cluster (as its owner) and removes
it (a cluster ``destroy()`` already removed is left alone)."""


def find_pg_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (Debian keeps them off the PATH)."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise ConfigurationError(
        "PostgreSQL server programs not found (initdb): install them, e.g."
        " apt-get install postgresql, or set PG_BINDIR"
    )


def _version_key(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


PORT_ATTEMPTS = 3
"""Ports a new cluster tries (see `TemporaryPostgres.start`)."""
ADDRESS_IN_USE = "Address already in use"
"""What the server log says when the port was taken (the C library's text, not localised by
the cluster, which initdb makes with ``--locale=C.UTF-8``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryPostgres:
    """A PostgreSQL cluster in a temporary directory, ready for logical replication.

    Use as a context manager; ``dsn`` connects as the superuser ``postgres`` over TCP with
    trust authentication (loopback only).
    """

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bindir = find_pg_bindir()
        self.port = free_port()
        self.settings = {
            "wal_level": "logical",
            "max_wal_senders": "20",
            "max_replication_slots": "20",
            "listen_addresses": "'127.0.0.1'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "wal_sender_timeout": "60s",
        } | (settings or {})
        self.directory: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._guard: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        assert self.directory is not None
        return self.directory / "data"

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A libpq URL for ``dbname`` as ``user``."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def __enter__(self) -> TemporaryPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def start(self) -> None:
        """initdb (first time only) and start the server; wait until it accepts connections."""
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="changefeed-pg-"))
            if os.geteuid() == 0:
                self._user = pwd.getpwnam(os.environ.get("CHANGEFEED_PG_USER", "nobody"))
                os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
            self._run(
                [self.bindir / "initdb", "-D", self.datadir, "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
            )
            config = "".join(f"{key} = {value}\n" for key, value in self.settings.items())
            config += f"port = {self.port}\nunix_socket_directories = '{self.directory}'\n"
            with open(self.datadir / "postgresql.conf", "a") as file:
                file.write(config)
            self._start_guard()
            # The port was free when picked; another process may bind it before the server
            # does. A first start then moves to another port (a restart keeps its own).
            for _ in range(PORT_ATTEMPTS - 1):
                logged = len(self.log())
                try:
                    self._pg_ctl_start()
                    return
                except ConfigurationError:
                    if ADDRESS_IN_USE not in self.log()[logged:]:  # this attempt's lines
                        raise
                self.port = free_port()
                with open(self.datadir / "postgresql.conf", "a") as file:
                    file.write(f"port = {self.port}\n")  # the last setting of a name wins
        self._pg_ctl_start()

    def _pg_ctl_start(self) -> None:
        assert self.directory is not None
        self._run(
            [self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.directory / "server.log",
             "-w", "-t", "60", "start"]
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects clients; ``immediate`` is a crash)."""
        if self.directory is not None and (self.datadir / "postmaster.pid").exists():
            self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        """Stop and start again on the same port and data. A server that does not stop in time
        (a walsender waiting for a client that does not read) is stopped as in a crash."""
        try:
            self.stop()
        except ConfigurationError:
            self.stop("immediate")
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete the cluster."""
        try:
            self.stop("immediate")
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            self._stop_guard()

    def _start_guard(self) -> None:
        """Start the guard that cleans up if this process ends without `destroy` (see the
        module's notes), in a session of its own so that a signal to our process group (Ctrl-C)
        does not end it first."""
        assert self.directory is not None
        owner = f"{self._user.pw_uid}:{self._user.pw_gid}" if self._user is not None else ""
        self._guard = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD, str(self.bindir / "pg_ctl"),
             str(self.datadir), str(self.directory), owner],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", start_new_session=True,
        )

    def _stop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            assert guard.stdin is not None
            guard.stdin.close()  # the EOF it waits for; the cluster is gone already
            guard.wait()

    def log(self) -> str:
        """The server log so far (for test failure messages)."""
        assert self.directory is not None
        try:
            return (self.directory / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _run(self, argv: list[object]) -> None:
        args = [str(arg) for arg in argv]
        kwargs: dict[str, object] = {"capture_output": True, "text": True, "cwd": self.directory}
        if self._user is not None:
            kwargs["user"] = self._user.pw_uid
            kwargs["group"] = self._user.pw_gid
            kwargs["extra_groups"] = []
            kwargs["env"] = {**os.environ, "HOME": str(self.directory)}
        started = time.monotonic()
        result = subprocess.run(args, **kwargs)  # type: ignore[call-overload]
        if result.returncode != 0:
            raise ConfigurationError(
                f"{Path(args[0]).name} failed after {time.monotonic() - started:.1f} s:"
                f" {(result.stderr or result.stdout).strip()}"
            )
