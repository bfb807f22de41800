"""Electric's shape API served by ``changefeed serve``, synced by the real
``@electric-sql/client`` in Node: initial sync, live changes entering and leaving ``where``s of
every kind, columns, offline clients resuming across restarts, SIGKILL, must-refetch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
from synctools import Server, ShapeClient, electric_rows, get, make_items, shape_clients, shape_url
from waiting import wait_until

pytestmark = pytest.mark.postgres

WHERES = [
    "priority >= 3",
    "done AND priority IN (1, 2)",
    "NOT done OR title LIKE 'x%'",
    "due IS NULL",
    "price > 10.5 AND due > '2024-06-01'",
    "title ILIKE 'a%' OR meta IS NOT NULL",
    "big BETWEEN 5 AND 50 AND priority <> 4",
    "due::date = '2024-07-01' OR price IS NULL",
]


def shuffle_items(pg: psycopg.Connection) -> None:
    """Writes that move rows into and out of every `WHERES` shape, inserts and deletes."""
    pg.execute("UPDATE items SET priority = 4 WHERE id IN (1, 2, 3)")  # into >= 3, out of <> 4
    pg.execute("UPDATE items SET priority = 0 WHERE id IN (8, 9)")  # out of >= 3
    pg.execute("UPDATE items SET done = NOT done WHERE id BETWEEN 4 AND 7")
    pg.execute("UPDATE items SET title = 'xenon' WHERE id = 5")
    pg.execute("UPDATE items SET title = 'Avocado' WHERE id = 11")
    pg.execute("UPDATE items SET due = NULL WHERE id IN (1, 10)")  # into IS NULL
    pg.execute("UPDATE items SET due = '2024-07-01 12:00+00' WHERE id IN (4, 12)")  # out of it
    pg.execute("UPDATE items SET price = 10.50 WHERE id = 13")  # out of > 10.5
    pg.execute("UPDATE items SET price = NULL WHERE id = 14")
    pg.execute("UPDATE items SET meta = '{\"new\": true}' WHERE id = 15")
    pg.execute("UPDATE items SET big = 6 WHERE id = 19")
    pg.execute("INSERT INTO items VALUES (100, 'apple new', true, 1, 99.99,"
               " '2024-08-01 00:00+00', ARRAY['n'], NULL, 7)")
    pg.execute("INSERT INTO items VALUES (101, 'x-ray', false, 3, NULL, NULL, NULL,"
               " '[1, 2]', 48)")
    pg.execute("DELETE FROM items WHERE id IN (6, 16)")
    pg.execute("UPDATE items SET id = 200 WHERE id = 17")  # the key itself changes
    with pg.transaction():  # several changes of one row in one transaction
        pg.execute("UPDATE items SET priority = 3 WHERE id = 18")
        pg.execute("UPDATE items SET priority = 1, done = true WHERE id = 18")


@pytest.mark.parametrize("sse", [False, True], ids=["long-poll", "sse"])
def test_clients_follow_rows_entering_and_leaving_their_where(
    pg_dsn: str, pg: psycopg.Connection, sse: bool
) -> None:
    make_items(pg)
    with Server(pg_dsn, ["items"]).start() as server:
        clients = shape_clients(server, "items", [{"where": where, "sse": sse}
                                                  for where in [*WHERES, None]])
        try:
            for client, where in zip(clients, [*WHERES, None], strict=True):
                event = client.wait_rows(lambda w=where: electric_rows(pg, "items", w))
                assert event["shapeRows"] == event["rows"]  # the client's own Shape agrees
            shuffle_items(pg)
            for client, where in zip(clients, [*WHERES, None], strict=True):
                event = client.wait_rows(lambda w=where: electric_rows(pg, "items", w))
                assert event["shapeRows"] == event["rows"]
                assert client.refetches() == 0 and not client.errors()
        finally:
            clients[0].stop()


def test_where_on_every_type_matches_postgresql(pg_dsn: str, pg: psycopg.Connection) -> None:
    """Each type's literals and comparisons give the rows PostgreSQL itself selects."""
    pg.execute("CREATE TABLE typed (id bigint PRIMARY KEY, n numeric, f float8, b boolean,"
               " t text, ts timestamp, tz timestamptz, d date, u uuid, s smallint)")
    pg.execute("INSERT INTO typed SELECT g, g / 4.0, g * 0.5, g % 3 = 0, 'v' || (g % 7),"
               " timestamp '2024-01-01' + g * interval '7 hours',"
               " timestamptz '2024-01-01 00:00+00' + g * interval '11 hours',"
               " date '2024-01-01' + g, ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))"
               "::uuid, g % 9 FROM generate_series(1, 60) g")
    wheres = [
        "n >= 7.25", "n = '3.5'", "f < 4", "f > 10.5 OR f = 1",
        "b", "b IS FALSE AND s > 4", "t IN ('v1', 'v3')", "t NOT IN ('v2') AND t >= 'v5'",
        "ts > '2024-01-05 12:00'", "ts < '2024-01-03'::date", "tz BETWEEN '2024-01-10'"
        " AND '2024-01-20 06:00:00+00'", "tz >= '2024-01-15T00:00:00+02:00'",
        "d = '2024-01-31'", "d > '2024-02-15' OR d < '2024-01-03'",
        "u = '00000000-0000-0000-0000-000000000007'", "s % 2 = 1 AND id > 30",
        "upper(t) = 'V4'", "length(t) = 2 AND NOT b", "id IS DISTINCT FROM 5 AND id < 8",
        "coalesce(n, 0) * 2 > 25",
    ]
    with Server(pg_dsn, ["typed"]).start() as server:
        clients = shape_clients(server, "typed", [{"where": where} for where in wheres])
        try:
            for client, where in zip(clients, wheres, strict=True):
                expected = electric_rows(pg, "typed", where)
                assert expected, f"{where} selects no row: the case tests nothing"
                client.wait_rows(lambda w=where: electric_rows(pg, "typed", w))
            pg.execute("UPDATE typed SET n = n + 1, b = NOT b, t = 'v' || (id % 5),"
                       " tz = tz + interval '3 days', d = d - 20 WHERE id % 2 = 0")
            for client, where in zip(clients, wheres, strict=True):
                client.wait_rows(lambda w=where: electric_rows(pg, "typed", w))
        finally:
            clients[0].stop()


def test_a_columns_shape_gets_only_its_columns(pg_dsn: str, pg: psycopg.Connection) -> None:
    make_items(pg, 8)
    with Server(pg_dsn, ["items"]).start() as server:
        columns = ["id", "title", "price"]
        client, full = shape_clients(server, "items", [
            {"columns": columns, "where": "priority > 1"},
            {"columns": ["id", "done"], "replica": "full"}])
        with client:
            first = client.wait_rows(lambda: electric_rows(pg, "items", "priority > 1", columns))
            full.wait_rows(lambda: electric_rows(pg, "items", None, ["id", "done"]))
            pg.execute("UPDATE items SET big = big + 1")  # no column of the first shape
            pg.execute("UPDATE items SET title = 'renamed' WHERE id = 2")
            pg.execute("UPDATE items SET priority = 0 WHERE id = 3")  # leaves the where
            pg.execute("UPDATE items SET done = true WHERE id = 4")
            event = client.wait_rows(lambda: electric_rows(pg, "items", "priority > 1", columns))
            # Only the rename and the row leaving the shape came: the big update sent nothing.
            assert event["messages"] - first["messages"] == 2
            full.wait_rows(lambda: electric_rows(pg, "items", None, ["id", "done"]))


def test_an_offline_client_resumes_from_its_handle_after_a_restart(
    pg_dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    make_items(pg)
    where = "priority >= 2 OR done"
    server = Server(pg_dsn, ["items"], log=tmp_path / "serve.log").start()
    try:
        with ShapeClient(server, "items", where=where) as client:
            saved = client.wait_rows(lambda: electric_rows(pg, "items", where))
        shuffle_items(pg)  # while the client is offline
        assert server.stop() == 0
        pg.execute("UPDATE items SET priority = 9 WHERE id IN (8, 9)")  # while the server is down
        pg.execute("DELETE FROM items WHERE id = 10")
        server.start()
        pg.execute("INSERT INTO items (id, title, priority) VALUES (300, 'after', 5)")
        for _ in range(2):  # resume twice from saved states: the handle stays valid
            with ShapeClient(server, "items", where=where, handle=saved["handle"],
                             offset=saved["offset"], rows=saved["rows"]) as client:
                saved = client.wait_rows(lambda: electric_rows(pg, "items", where))
                assert client.refetches() == 0 and not client.errors()
            pg.execute("UPDATE items SET done = true WHERE id = 300")
    finally:
        server.__exit__()


def test_sigkill_of_the_server_mid_stream_loses_nothing(
    pg_dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    make_items(pg)
    where = "priority >= 2"
    server = Server(pg_dsn, ["items"], log=tmp_path / "serve.log").start()
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            n = 1000
            while not stop.is_set():
                n += 1
                conn.execute("INSERT INTO items (id, title, priority) VALUES (%s, 'w', %s)",
                             [n, n % 4])
                conn.execute("UPDATE items SET priority = (priority + 1) %% 4 WHERE id = %s",
                             [n % 20 + 1])
                time.sleep(0.01)  # the writer's pace

    try:
        client, sse = shape_clients(server, "items", [{"where": where}, {"sse": True}])
        with client:
            client.wait_rows(lambda: electric_rows(pg, "items", where))
            thread = threading.Thread(target=writer)
            thread.start()
            try:
                client.wait(lambda e: e["messages"] > 40, "live changes flowing")
                server.kill()
                time.sleep(1.0)  # writes go on while the server is down
                server.start()
                time.sleep(1.0)  # and while it starts again
            finally:
                stop.set()
                thread.join()
            client.wait_rows(lambda: electric_rows(pg, "items", where), timeout=60)
            sse.wait_rows(lambda: electric_rows(pg, "items"), timeout=60)
            assert client.refetches() == 0 and sse.refetches() == 0
    finally:
        server.__exit__()


def test_must_refetch_only_when_the_log_is_gone_and_never_twice(
    pg_dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    make_items(pg, 10)
    server = Server(pg_dsn, ["items"], log=tmp_path / "serve.log").start()
    try:
        with ShapeClient(server, "items", where="priority > 1") as client:
            saved = client.wait_rows(lambda: electric_rows(pg, "items", "priority > 1"))
        assert server.stop() == 0
        # The shape log is dropped (an operator reset it): offsets of the old log mean nothing.
        pg.execute("DROP SCHEMA changefeed_sync CASCADE")
        pg.execute("UPDATE items SET priority = 5 WHERE id = 1")
        server.start()
        with ShapeClient(server, "items", where="priority > 1", handle=saved["handle"],
                         offset=saved["offset"], rows=saved["rows"]) as client:
            event = client.wait_rows(lambda: electric_rows(pg, "items", "priority > 1"))
            assert event["handle"] != saved["handle"]
            pg.execute("UPDATE items SET priority = 0 WHERE id = 1")
            client.wait_rows(lambda: electric_rows(pg, "items", "priority > 1"))
            assert client.refetches() == 1
        # A handle of another shape (the where changed) must refetch: once.
        with ShapeClient(server, "items", where="priority > 2", handle=event["handle"],
                         offset=event["offset"], rows=event["rows"]) as client:
            client.wait_rows(lambda: electric_rows(pg, "items", "priority > 2"))
            assert client.refetches() == 1
        # The same handle from a restarted server: served, no refetch.
        assert server.stop() == 0
        server.start()
        with ShapeClient(server, "items", where="priority > 1", handle=event["handle"],
                         offset=event["offset"], rows=event["rows"]) as client:
            client.wait_rows(lambda: electric_rows(pg, "items", "priority > 1"))
            assert client.refetches() == 0
    finally:
        server.__exit__()


def wait_for_count(pg: psycopg.Connection, query: str, what: str, timeout: float = 30) -> None:
    """Wait until compaction has removed every row ``query`` counts."""
    wait_until(lambda: pg.execute(query).fetchone()[0] == 0, f"compaction to remove the {what}",
               timeout, step=0.1)


def test_offsets_older_than_the_log_window_are_served_or_refetched_once(
    pg_dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    """Past the log window a client gets each changed key as it is now (deletes included);
    past the tombstone window it must refetch, once."""
    make_items(pg, 12)
    settings = {"log_window": 0.5, "tombstone_window": 8.0, "compact_interval": 0.3}
    server = Server(pg_dsn, ["items"], settings=settings, log=tmp_path / "serve.log").start()
    where = "priority >= 1"
    try:
        with ShapeClient(server, "items", where=where) as client:
            saved = client.wait_rows(lambda: electric_rows(pg, "items", where))
        shuffle_items(pg)
        # The log window passes, and compaction with it (the tombstones stay for 8 s more).
        wait_for_count(pg, "SELECT count(*) FROM changefeed_sync.log", "the log's entries")
        _, _, state = get(server.base + "/healthz")
        assert state["services"]["sync"]["ready"]
        with ShapeClient(server, "items", where=where, handle=saved["handle"],
                         offset=saved["offset"], rows=saved["rows"]) as client:
            client.wait_rows(lambda: electric_rows(pg, "items", where))
            assert client.refetches() == 0
        wait_for_count(pg, "SELECT count(*) FROM changefeed_sync.rows WHERE row IS NULL",
                       "the tombstones")
        with ShapeClient(server, "items", where=where, handle=saved["handle"],
                         offset=saved["offset"], rows=saved["rows"]) as client:
            client.wait_rows(lambda: electric_rows(pg, "items", where))
            assert client.refetches() == 1
    finally:
        server.__exit__()


BAD_REQUESTS = [
    ({"offset": "-1"}, 400, "table is required"),
    ({"table": "items", "offset": "-1", "where": "priority >"}, 400, "where: cannot parse"),
    ({"table": "items", "offset": "-1", "where": "nope = 1"}, 400, "unknown column 'nope'"),
    ({"table": "items", "offset": "-1", "where": "priority = 'high'"}, 400,
     "invalid input syntax for type int"),
    ({"table": "items", "offset": "-1", "where": "title = 3"}, 400, "cannot compare"),
    ({"table": "items", "offset": "-1", "where": "id IN (SELECT 1)"}, 400, "IN takes a list"),
    ({"table": "items", "offset": "-1", "where": "(SELECT 1) = 1"}, 400, "subquery"),
    ({"table": "items", "offset": "-1", "where": "id = 1; DROP TABLE items"}, 400,
     "one expression"),
    ({"table": "items", "offset": "-1", "where": "pg_sleep(1) IS NULL"}, 400, "not supported"),
    ({"table": "items", "offset": "-1", "where": "title"}, 400, "not a boolean"),
    ({"table": "items", "offset": "-1", "where": "id = $1"}, 400, "params[1] is not given"),
    ({"table": "items", "offset": "-1", "columns": "title"}, 400, "primary key"),
    ({"table": "items", "offset": "-1", "columns": "id,nope"}, 400, "unknown column 'nope'"),
    ({"table": "items", "offset": "-1", "columns": "id,id"}, 400, "twice"),
    ({"table": "items", "offset": "abc"}, 400, "offset 'abc'"),
    ({"table": "items"}, 400, "offset is required"),
    ({"table": "items", "offset": "3_0"}, 400, "handle is required"),
    ({"table": "items", "offset": "-1", "replica": "half"}, 400, "replica must be"),
    ({"table": "items", "offset": "-1", "subset__where": "id = 1"}, 400, "subset"),
    ({"table": "items;x", "offset": "-1"}, 400, "table"),
    ({"table": "secrets", "offset": "-1"}, 403, "table public.secrets is not served"),
    ({"table": "other.items", "offset": "-1"}, 403, "table other.items is not served"),
    ({"table": "changefeed_sync.rows", "offset": "-1"}, 403, "is not served"),
]


def test_bad_shape_requests_get_one_line_and_unserved_tables_are_refused(
    pg_dsn: str, pg: psycopg.Connection
) -> None:
    make_items(pg, 3)
    pg.execute("CREATE TABLE secrets (id int PRIMARY KEY, pin text)")
    with Server(pg_dsn, ["items"]).start() as server:
        for params, status, words in BAD_REQUESTS:
            code, headers, body = get(shape_url(server, **params))
            assert code == status, (params, body)
            assert words in body["message"], (params, body)
            assert "\n" not in body["message"] and "Traceback" not in body["message"]
        # A good request still works, and params fill $1.
        code, headers, body = get(shape_url(server, table="items", offset="-1",
                                            where="id = $1", **{"params[1]": "2"}))
        assert code == 200 and [m["value"]["id"] for m in body if "key" in m] == ["2"]
        assert headers["electric-up-to-date"] == "" and "electric-schema" in headers
        # A catch-up answer is cacheable, and revalidates by its etag.
        url = shape_url(server, table="items", offset=headers["electric-offset"],
                        handle=headers["electric-handle"],
                        where="id = $1", **{"params[1]": "2"})
        code, headers, body = get(url)
        assert code == 200 and "max-age=60" in headers["cache-control"]
        assert get(url, {"if-none-match": headers["etag"]})[0] == 304
