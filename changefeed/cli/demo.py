"""``changefeed demo``: live deltas from a throwaway PostgreSQL, with no set-up.

It starts a temporary cluster (initdb in a temporary directory, wal_level=logical), creates a
``tasks`` table, runs a writer thread that inserts, updates and deletes tasks, and streams the
deltas to stdout exactly as ``changefeed run tasks`` would. Everything is removed at the end.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

import psycopg

from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.change import ALL, Change
from changefeed.cli.run import deliver_with_signals
from changefeed.delivery import LineOutput, buffered_stdout
from changefeed.embedded import TemporaryPostgres

log = logging.getLogger("changefeed")

TITLES = ["write docs", "fix flaky test", "review PR", "ship release", "answer issue",
          "tune autovacuum", "rotate keys", "plan sprint"]


def _writer(dsn: str, stop: threading.Event, feed: PostgresChangeFeed,
            seconds: float | None) -> None:
    """Insert, update and delete tasks, from the moment ``feed`` handed out its first change
    (the snapshot's row: the demo opens with the table as it is, also on a machine slow to
    start the feed), for ``seconds`` from then (None: until stopped)."""
    while not feed.stats.changes:
        if stop.wait(0.05):
            return
    if seconds:
        threading.Timer(seconds, feed.stop).start()
    rng = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.wait(0.4):
            ids = [row[0] for row in conn.execute("SELECT id FROM tasks")]
            action = rng.random()
            if action < 0.5 or len(ids) < 3:
                conn.execute(
                    "INSERT INTO tasks (title, priority) VALUES (%s, %s)",
                    [rng.choice(TITLES), rng.randint(1, 5)],
                )
            elif action < 0.85:
                conn.execute(
                    "UPDATE tasks SET done = NOT done, priority = %s, updated_at = now()"
                    " WHERE id = %s",
                    [rng.randint(1, 5), rng.choice(ids)],
                )
            else:
                conn.execute("DELETE FROM tasks WHERE id = %s", [rng.choice(ids)])


def run_demo(seconds: float | None, encode: Callable[[Change], bytes]) -> None:
    """Run the demo: the table as it is, then ``seconds`` of live changes (None: until
    Ctrl-C)."""
    log.info("starting a throwaway PostgreSQL cluster (initdb in a temporary directory)")
    with TemporaryPostgres() as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE tasks (id serial PRIMARY KEY, title text NOT NULL,"
                " done boolean NOT NULL DEFAULT false, priority int,"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute("ALTER TABLE tasks REPLICA IDENTITY FULL")  # updates carry oldData
            conn.execute("INSERT INTO tasks (title, priority) VALUES ('try changefeed', 1)")
        log.info(
            "demo table ready; streaming deltas%s (the first row comes from the snapshot)",
            f" for {seconds:g} s" if seconds else " until Ctrl-C",
        )
        stop = threading.Event()
        feed = PostgresChangeFeed("tasks", ALL, connection=dsn, prefeed="snapshot")
        writer = threading.Thread(target=_writer, args=(dsn, stop, feed, seconds), daemon=True)
        writer.start()
        try:
            deliver_with_signals(feed, LineOutput(buffered_stdout(), encode))
        finally:
            stop.set()
            writer.join(timeout=5)


WEB_TABLE = (
    "CREATE TABLE tasks (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), title text NOT NULL,"
    " done boolean NOT NULL DEFAULT false, priority int,"
    " updated_at timestamptz NOT NULL DEFAULT now())"
)


def _web_writer(dsn: str, stop: threading.Event, seconds: float = 2.0) -> None:
    """The other user of the web demo: adds, edits and deletes a task every few seconds."""
    rng = random.Random(11)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.wait(seconds):
            ids = [row[0] for row in conn.execute("SELECT id FROM tasks ORDER BY id")]
            action = rng.random()
            if action < 0.4 or len(ids) < 4:
                conn.execute("INSERT INTO tasks (title, priority) VALUES (%s, %s)",
                             [rng.choice(TITLES), rng.randint(1, 5)])
            elif action < 0.85 or len(ids) < 8:
                conn.execute("UPDATE tasks SET priority = %s, updated_at = now() WHERE id = %s",
                             [rng.randint(1, 5), rng.choice(ids)])
            else:
                conn.execute("DELETE FROM tasks WHERE id = %s", [rng.choice(ids)])


def run_web_demo(host: str, port: int, seconds: float | None, writer_seconds: float = 2.0) -> None:
    """``changefeed demo --web``: the throwaway PostgreSQL, a ``tasks`` table with a writer,
    and ``changefeed serve`` for it with a page (``/demo``) showing the table syncing live,
    edited offline and catching up. Runs until Ctrl-C or SIGTERM (or ``seconds``)."""
    import os
    import signal

    from changefeed.serve.server import run_server
    from changefeed.serve.sync import SyncService
    from changefeed.serve.sync.demo_page import DemoPage

    log.info("starting a throwaway PostgreSQL cluster (initdb in a temporary directory)")
    with TemporaryPostgres() as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(WEB_TABLE)
            conn.execute("INSERT INTO tasks (title, priority) VALUES ('try changefeed', 1),"
                         " ('edit me offline', 2), ('tick me', 3)")
        log.info("database: psql -h 127.0.0.1 -p %s -U postgres postgres (table tasks)",
                 server.port)
        log.info("open http://%s:%s/demo in a browser", host if ":" not in host else f"[{host}]",
                 port or "PORT")
        stop = threading.Event()
        writer = threading.Thread(target=_web_writer, args=(dsn, stop, writer_seconds),
                                  daemon=True)
        if writer_seconds:
            writer.start()
        if seconds:
            timer = threading.Timer(seconds, os.kill, [os.getpid(), signal.SIGTERM])
            timer.daemon = True
            timer.start()
        try:
            run_server([SyncService(dsn, ["tasks"]), DemoPage()], host=host, port=port)
        finally:
            stop.set()
            if writer.is_alive():
                writer.join(timeout=5)
