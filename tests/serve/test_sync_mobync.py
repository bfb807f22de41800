"""Mobync's sync protocol on ``POST /sync``: devices of one owner see each other's writes and
the application's, other owners see and change none, rejected diffs do not block the others,
retries apply nothing twice, bad tokens and bodies get one line."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from clitools import assert_exit, run_cli
from synctools import Server, get, post, shape_url
from waiting import wait_until

pytestmark = pytest.mark.postgres

APP = ["--app", "sync_app:App"]


def make_tables(pg: psycopg.Connection) -> None:
    pg.execute("CREATE TABLE notes (id uuid PRIMARY KEY, owner text NOT NULL, title text,"
               " n int NOT NULL DEFAULT 0 CHECK (n >= 0), due date)")
    pg.execute("CREATE TABLE tags (id int PRIMARY KEY, owner text NOT NULL, name text)")
    pg.execute("CREATE TABLE secrets (id int PRIMARY KEY, owner text NOT NULL)")


class Device:
    """A Mobync device: a clock and its rows, kept by applying the server's diffs."""

    def __init__(self, server: Server, token: str) -> None:
        self.server = server
        self.token = token
        self.clock = 0
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.answers: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []

    def sync_until(self, expected: Any, timeout: float = 20) -> None:
        """Sync until the device's rows equal ``expected()``: others' writes reach the log
        (and so the answers) a moment after they commit."""
        def sync_after(seconds: float) -> None:
            time.sleep(seconds)
            self.sync()

        wait_until(lambda: self.rows == expected(), "the device's rows", timeout,
                   said=lambda: f"{self.rows} != {expected()}", pause=sync_after, step=0.1)

    def sync(self, *diffs: dict[str, Any], expect: int = 200) -> dict[str, Any]:
        status, answer = post(f"{self.server.base}/sync", {
            "auth_token": self.token, "logical_clock": self.clock, "diffs": list(diffs)})
        assert status == expect, answer
        self.answers.append(answer)
        if status == 200:
            self.seen.extend(answer["diffs"])
            assert answer["success"] is True
            for diff in answer["diffs"]:
                data = json.loads(diff["json_data"])
                key = (diff["model"], str(data["id"]))
                if diff["type"] == 2:
                    self.rows.pop(key, None)
                else:
                    self.rows[key] = {**self.rows.get(key, {}), **data}
            clocks = [diff["logical_clock"] for diff in answer["diffs"]]
            assert clocks == sorted(clocks)
            self.clock = answer["logical_clock"]
        return answer


def diff(kind: int, model: str, data: dict[str, Any], owner: str | None = None,
         identifier: str | None = None, as_text: bool = True) -> dict[str, Any]:
    return {"id": identifier or str(uuid.uuid4()), "owner": owner, "logical_clock": 0,
            "utc_timestamp": 1_700_000_000_000, "type": kind, "model": model,
            "json_data": json.dumps(data) if as_text else data}


def owner_rows(pg: psycopg.Connection, owner: str) -> dict[tuple[str, str], dict[str, Any]]:
    rows = {}
    for model in ("notes", "tags"):
        for (row,) in pg.execute(f"SELECT to_jsonb(t) FROM {model} t WHERE owner = %s",
                                 [owner]):
            rows[(model, str(row["id"]))] = row
    return rows


def test_devices_of_one_owner_see_each_others_writes_and_the_applications(
    pg_dsn: str, pg: psycopg.Connection
) -> None:
    make_tables(pg)
    pg.execute("INSERT INTO notes (id, owner, title) VALUES (gen_random_uuid(), 'alice', 'old'),"
               " (gen_random_uuid(), 'bob', 'bobs')")
    with Server(pg_dsn, ["notes", "tags"], app="sync_app:App", owner_column="owner").start() \
            as server:
        phone, laptop = Device(server, "alice-phone"), Device(server, "alice-laptop")
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        answer = phone.sync(diff(0, "notes", {"id": first, "title": "from phone", "due":
                                              "2024-02-29"}, owner="alice"),
                            diff(0, "tags", {"id": 7, "name": "red"}, as_text=False))
        assert len(answer["applied"]) == 2 and answer["rejected"] == []
        assert phone.rows == owner_rows(pg, "alice")  # its own writes came back, in the log
        laptop.sync()  # a fresh device: every row of its owner as creates
        assert laptop.rows == owner_rows(pg, "alice")
        assert all(d["type"] == 0 for d in laptop.answers[-1]["diffs"])
        laptop.sync(diff(1, "notes", {"id": first, "n": 3}),  # a partial update, merged
                    diff(0, "notes", {"id": second, "title": "from laptop"}))
        # The application writes directly: alice's rows change, bob's must not show up.
        pg.execute("INSERT INTO notes (id, owner, title) VALUES (gen_random_uuid(), 'alice',"
                   " 'by app'), (gen_random_uuid(), 'bob', 'bob app')")
        pg.execute("UPDATE notes SET title = 'edited by app' WHERE title = 'old'")
        pg.execute("DELETE FROM tags WHERE id = 7")
        pg.execute("UPDATE notes SET title = 'bob edit' WHERE owner = 'bob'")
        seen = len(phone.seen)
        phone.sync_until(lambda: owner_rows(pg, "alice"))
        assert {json.loads(d["json_data"]).get("title") for d in phone.seen[seen:]} >= {
            "by app", "edited by app", "from laptop"}
        assert all(d["owner"] == "alice" for d in phone.seen)
        laptop.sync_until(lambda: phone.rows)
        assert phone.sync()["diffs"] == []  # nothing new: nothing comes


def test_another_owner_sees_none_of_the_rows_and_can_change_none(
    pg_dsn: str, pg: psycopg.Connection
) -> None:
    make_tables(pg)
    mine = str(uuid.uuid4())
    pg.execute("INSERT INTO notes (id, owner, title) VALUES (%s, 'alice', 'private')", [mine])
    pg.execute("INSERT INTO tags VALUES (1, 'alice', 'a'), (2, 'bob', 'b')")
    with Server(pg_dsn, ["notes", "tags"], app="sync_app:App", owner_column="owner").start() \
            as server:
        bob, alice = Device(server, "bob-phone"), Device(server, "alice-phone")
        bob.sync()
        alice.sync()
        assert set(bob.rows) == {("tags", "2")}
        before = owner_rows(pg, "alice")
        answer = bob.sync(
            diff(1, "notes", {"id": mine, "title": "hacked"}),
            diff(2, "notes", {"id": mine}),
            diff(0, "notes", {"id": str(uuid.uuid4()), "owner": "alice", "title": "planted"}),
            diff(1, "tags", {"id": 1, "name": "renamed"}),
            diff(1, "tags", {"id": 2, "owner": "alice"}),  # giving his row away
            diff(0, "tags", {"id": 3, "name": "claims"}, owner="alice"),
            diff(0, "tags", {"id": 1, "name": "same key"}),  # alice's key: a conflict
        )
        assert answer["applied"] == []
        reasons = [r["reason"] for r in answer["rejected"]]
        assert len(reasons) == 7 and all("\n" not in reason for reason in reasons)
        assert "no row of public.notes with that key is yours" in reasons[0]
        assert "created for another owner" in reasons[2]
        assert "given to another owner" in reasons[4]
        assert "the diff's owner is not the token's owner" in reasons[5]
        assert owner_rows(pg, "alice") == before
        assert bob.sync()["diffs"] == [] and set(bob.rows) == {("tags", "2")}
        # Reads through the shape API are kept to the token's owner whatever the where says.
        bobs = {"authorization": "Bearer bob-phone"}
        for where in ("owner = 'alice'", "true", "id = 1 OR owner <> 'bob'"):
            code, _, body = get(shape_url(server, table="tags", offset="-1", where=where), bobs)
            assert code == 200
            assert [m["value"]["owner"] for m in body if "key" in m] in ([], ["bob"]), where
        code, headers, body = get(shape_url(server, table="tags", offset="-1"), bobs)
        assert "private" in headers["cache-control"] and headers["vary"] == "Authorization"
        assert [m["value"]["id"] for m in body if "key" in m] == ["2"]
        # The application moves a row from alice to bob: it leaves alice's devices, enters
        # bob's.
        pg.execute("UPDATE tags SET owner = 'bob' WHERE id = 1")
        seen = len(alice.seen)
        alice.sync_until(lambda: owner_rows(pg, "alice"))
        assert [(d["type"], json.loads(d["json_data"])) for d in alice.seen[seen:]] == [
            (2, {"id": 1})]
        seen = len(bob.seen)
        bob.sync_until(lambda: owner_rows(pg, "bob"))
        assert [d["type"] for d in bob.seen[seen:]] == [0]
        assert set(bob.rows) == {("tags", "1"), ("tags", "2")}


def test_rejected_diffs_are_reported_and_do_not_block_the_others(
    pg_dsn: str, pg: psycopg.Connection
) -> None:
    make_tables(pg)
    keep = str(uuid.uuid4())
    pg.execute("INSERT INTO notes (id, owner, title) VALUES (%s, 'alice', 'keep')", [keep])
    with Server(pg_dsn, ["notes", "tags"], app="sync_app:App", owner_column="owner").start() \
            as server:
        device = Device(server, "alice-phone")
        good = str(uuid.uuid4())
        diffs = [
            diff(0, "notes", {"id": good, "title": "fine"}, identifier="good-create"),
            diff(0, "notes", {"id": str(uuid.uuid4()), "title": "forbidden"},
                 identifier="validator-says-no"),
            diff(0, "notes", {"id": str(uuid.uuid4()), "colour": "red"}, identifier="unknown"),
            diff(0, "secrets", {"id": 1}, identifier="unserved"),
            diff(1, "notes", {"id": keep, "title": "forbidden"}, identifier="async-validator"),
            diff(1, "notes", {"id": keep, "n": -1}, identifier="check-constraint"),
            diff(1, "notes", {"id": keep, "due": "not a date"}, identifier="bad-value"),
            diff(1, "notes", {"title": "no key"}, identifier="no-key"),
            diff(1, "notes", {"id": good, "n": 2}, identifier="good-update"),
            diff(2, "tags", {"id": 999}, identifier="delete-validator"),
            diff(2, "notes", {"id": keep}, identifier="good-delete"),
        ]
        answer = device.sync(*diffs)
        assert answer["applied"] == ["good-create", "good-update", "good-delete"]
        rejected = {r["id"]: r["reason"] for r in answer["rejected"]}
        assert set(rejected) == {"validator-says-no", "unknown", "unserved", "async-validator",
                                 "check-constraint", "bad-value", "no-key",
                                 "delete-validator"}
        assert "validate_create" in rejected["validator-says-no"]
        assert "validate_update" in rejected["async-validator"]
        assert "validate_delete" in rejected["delete-validator"]
        assert "no column 'colour'" in rejected["unknown"]
        assert rejected["unserved"] == "table public.secrets is not served"
        assert "check constraint" in rejected["check-constraint"]
        assert "date" in rejected["bad-value"]
        assert all("\n" not in reason for reason in rejected.values())
        assert pg.execute("SELECT id::text, n FROM notes").fetchall() == [(good, 2)]
        assert device.rows == owner_rows(pg, "alice")


def test_a_retried_request_applies_nothing_twice(pg_dsn: str, pg: psycopg.Connection) -> None:
    make_tables(pg)
    with Server(pg_dsn, ["notes", "tags"], app="sync_app:App", owner_column="owner").start() \
            as server:
        phone, laptop = Device(server, "alice-phone"), Device(server, "alice-laptop")
        note = str(uuid.uuid4())
        request = [diff(0, "notes", {"id": note, "title": "first"}, identifier="a"),
                   diff(1, "notes", {"id": note, "title": "from the phone"}, identifier="b"),
                   diff(0, "tags", {"id": 5, "name": "t"}, identifier="c")]
        phone.sync(*request)
        laptop.sync(diff(1, "notes", {"id": note, "title": "later, on the laptop"}))
        for _ in range(2):  # the phone never got the answer: it sends the same request again
            answer = phone.sync(*request)
            assert answer["applied"] == ["a", "b", "c"] and answer["rejected"] == []
        assert pg.execute("SELECT title FROM notes").fetchall() == [("later, on the laptop",)]
        assert pg.execute("SELECT count(*) FROM tags").fetchone() == (1,)
        # Diff ids are per owner: bob's diff "a" is his own, and applied.
        bob = Device(server, "bob-phone")
        answer = bob.sync(diff(0, "tags", {"id": 6, "name": "bob's"}, identifier="a"))
        assert answer["applied"] == ["a"]


@pytest.mark.parametrize("owner_column", ["owner", None])
def test_clocks_of_a_dropped_log_are_told_to_sync_again_from_0(
    pg_dsn: str, pg: psycopg.Connection, owner_column: str | None
) -> None:
    """Offsets of a new log start above every clock an earlier one gave out: a device is never
    served the new log's changes after its old clock (it would miss what came before)."""
    make_tables(pg)
    pg.execute("INSERT INTO tags VALUES (1, 'alice', 'a'), (2, 'alice', 'b')")
    server = Server(pg_dsn, ["notes", "tags"], app="sync_app:App",
                    owner_column=owner_column).start()
    try:
        device = Device(server, "alice-phone")
        device.sync()
        clocks = [1, device.clock]
        device.sync(diff(0, "tags", {"id": 3, "name": "c", "owner": "alice"}, as_text=False))
        clocks.append(device.clock)
        assert server.stop() == 0
        pg.execute("DROP SCHEMA changefeed_sync CASCADE")  # an operator resets the log
        pg.execute("UPDATE tags SET name = 'changed while no log was kept' WHERE id = 1")
        pg.execute("DELETE FROM tags WHERE id = 2")
        server.start()
        for clock in clocks:
            status, answer = post(f"{server.base}/sync", {
                "auth_token": "alice-phone", "logical_clock": clock, "diffs": []})
            assert status == 409 and "sync again from 0" in answer["message"], (clock, answer)
        device.clock, device.rows = 0, {}
        device.sync_until(lambda: owner_rows(pg, "alice"))
        assert device.clock > max(clocks)
    finally:
        server.__exit__()


BAD_BODIES: list[tuple[Any, int, str]] = [
    (b"{not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
    ({"auth_token": "alice-phone", "logical_clock": -1}, 400, "logical_clock"),
    ({"auth_token": "alice-phone", "logical_clock": "3"}, 400, "logical_clock"),
    ({"auth_token": "alice-phone", "logical_clock": 0, "diffs": {}}, 400, "diffs must be a list"),
    ({"auth_token": "alice-phone", "diffs": ["x"]}, 400, "diffs[0] must be an object"),
    ({"auth_token": "alice-phone", "diffs": [{"type": 0, "model": "notes", "json_data": "{}"}]},
     400, "diffs[0].id"),
    ({"auth_token": "alice-phone", "diffs": [{"id": "x", "type": 7, "model": "notes",
                                              "json_data": "{}"}]}, 400, "diffs[0].type"),
    ({"auth_token": "alice-phone", "diffs": [{"id": "x", "type": 0, "json_data": "{}"}]},
     400, "diffs[0].model"),
    ({"auth_token": "alice-phone", "diffs": [{"id": "x", "type": 0, "model": "notes",
                                              "json_data": "{oops"}]}, 400, "not JSON"),
    ({"auth_token": "alice-phone", "diffs": [{"id": "x", "type": 0, "model": "notes",
                                              "json_data": "[1]"}]}, 400, "JSON object"),
    ({"auth_token": 5}, 400, "auth_token must be a string"),
    ({"logical_clock": 0}, 401, "a token is required"),
    ({"auth_token": "nobody", "logical_clock": 0}, 401, "unknown token"),
    ({"auth_token": "revoked", "logical_clock": 0}, 403, "this token was revoked"),
]


def test_bad_tokens_and_malformed_bodies_get_one_line(pg_dsn: str, pg: psycopg.Connection
                                                      ) -> None:
    make_tables(pg)
    with Server(pg_dsn, ["notes"], app="sync_app:App", owner_column="owner").start() as server:
        for body, status, words in BAD_BODIES:
            code, answer = post(f"{server.base}/sync", body)
            assert code == status, (body, answer)
            assert answer["success"] is False and words in answer["message"], (body, answer)
            assert "\n" not in answer["message"]
        for headers, status in [({}, 401), ({"authorization": "Bearer nobody"}, 401),
                                ({"authorization": "Basic alice-phone"}, 401),
                                ({"authorization": "Bearer revoked"}, 403)]:
            code, _, body = get(shape_url(server, table="notes", offset="-1"), headers)
            assert code == status and "\n" not in body["message"], (headers, body)
        assert pg.execute("SELECT count(*) FROM notes").fetchone() == (0,)


def test_without_an_application_requests_are_anonymous(pg_dsn: str, pg: psycopg.Connection
                                                       ) -> None:
    make_tables(pg)
    with Server(pg_dsn, ["tags"]).start() as server:
        one, two = Device(server, ""), Device(server, "")
        one.sync(diff(0, "tags", {"id": 1, "owner": "x", "name": "n"}))
        two.sync()
        assert one.rows == two.rows == {("tags", "1"): {"id": 1, "owner": "x", "name": "n"}}


def test_serve_refuses_bad_sync_options_in_one_line(pg_dsn: str, pg: psycopg.Connection
                                                    ) -> None:
    make_tables(pg)
    pg.execute("CREATE TABLE nokey (a int)")
    cases = [
        (["tags", "--owner-column", "owner"], "--owner-column needs --app"),
        (["tags", *APP, "--owner-column", "colour"], "has no owner column 'colour'"),
        (["nope", *APP], "table 'nope' does not exist"),
        (["nokey"], "has no primary key"),
        (["tags", "--app", "no_such_module:App"], "cannot import no_such_module"),
        (["tags", "--app", "sync_app"], "MODULE:OBJECT"),
        (["tags", "--app", "sync_app:Nope"], "sync_app has no Nope"),
    ]
    for arguments, words in cases:
        result = run_cli("serve", "--url", pg_dsn, "--port", "0", *arguments,
                         env={"PYTHONPATH": str(Path(__file__).parent)})
        assert_exit(result, 2, words)
    assert pg.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
