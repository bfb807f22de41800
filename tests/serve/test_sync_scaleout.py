"""Several ``serve`` processes behind a load balancer share one shape log: one feeds it (the
advisory lock), all serve it with the same handles and offsets, and another takes over the
feed when the feeding process dies."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from synctools import Server, ShapeClient, electric_rows, get, make_items, shape_url
from waiting import wait_until

pytestmark = pytest.mark.postgres


def feeder_state(server: Server) -> str:
    return get(server.base + "/healthz")[2]["services"]["sync"]["feeder"]


def test_processes_share_the_log_and_take_over_the_feed(
    pg_dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    make_items(pg)
    first = Server(pg_dsn, ["items"], log=tmp_path / "first.log").start()
    second = Server(pg_dsn, ["items"], log=tmp_path / "second.log").start()
    try:
        assert sorted([feeder_state(first), feeder_state(second)]) == ["standby", "streaming"]
        feeding, standing = (first, second) if feeder_state(first) == "streaming" else (
            second, first)
        where = "priority >= 2"
        # Both processes give the same handle and offsets for a shape: a client may move.
        handles = {get(shape_url(s, table="items", offset="-1", where=where))[1][
            "electric-handle"] for s in (first, second)}
        assert len(handles) == 1
        with ShapeClient(feeding, "items", where=where) as client:
            saved = client.wait_rows(lambda: electric_rows(pg, "items", where))
        with ShapeClient(standing, "items", where=where, handle=saved["handle"],
                         offset=saved["offset"], rows=saved["rows"]) as client:
            pg.execute("UPDATE items SET priority = 4 WHERE id <= 5")
            client.wait_rows(lambda: electric_rows(pg, "items", where))
            feeding.kill()  # the feeding process dies: the other one takes the feed over
            pg.execute("UPDATE items SET priority = 0 WHERE id <= 3")
            pg.execute("INSERT INTO items (id, title, priority) VALUES (500, 'late', 3)")
            client.wait_rows(lambda: electric_rows(pg, "items", where), timeout=60)
            assert client.refetches() == 0
        wait_until(lambda: feeder_state(standing) == "streaming", "the other process to feed",
                   30, said=standing.errors, step=0.2)
    finally:
        first.__exit__()
        second.__exit__()
