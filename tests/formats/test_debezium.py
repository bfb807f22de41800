"""Debezium envelopes: checked against the shapes of Debezium's documented change events, then
made for real by ``changefeed run --format debezium`` on PostgreSQL and SecantusDB.

The documented examples below follow Debezium's PostgreSQL and MongoDB connector documentation
("Data change events": create, update, delete and snapshot read events of a ``customers``
table / collection, as JsonConverter writes them with ``schemas.enable=false``). The tests
compare field names and JSON types, and values where the same change determines them.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from clitools import run_cli

from changefeed import UNCHANGED, Operation
from changefeed.change import Change
from changefeed.formats.codec import dumps
from changefeed.formats.debezium import (
    UNAVAILABLE,
    DebeziumEncoder,
    Source,
    change_from_debezium,
    envelope,
    key,
)

COMMITTED = datetime(2019, 5, 28, 8, 58, 24, 863000, tzinfo=timezone.utc)
ROW = {"id": 1, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@noanswer.org"}

PG_SOURCE = {
    "version": "2.7.0.Final", "connector": "postgresql", "name": "PostgreSQL_server",
    "ts_ms": 1559033904863, "snapshot": "false", "db": "postgres",
    "sequence": '["24023119","24023128"]', "schema": "public", "table": "customers",
    "txId": 555, "lsn": 24023128, "xmin": None,
}
PG_DOCUMENTED = {
    "c": {"before": None, "after": ROW, "source": PG_SOURCE, "op": "c", "ts_ms": 1559033904863,
          "transaction": None},
    # REPLICA IDENTITY DEFAULT: an update has no before.
    "u": {"before": None, "after": {**ROW, "first_name": "Anne Marie"}, "source": PG_SOURCE,
          "op": "u", "ts_ms": 1465584025523, "transaction": None},
    "d": {"before": {"id": 1}, "after": None, "source": PG_SOURCE, "op": "d",
          "ts_ms": 1465581902461, "transaction": None},
    "r": {"before": None, "after": ROW, "source": {**PG_SOURCE, "snapshot": "true"}, "op": "r",
          "ts_ms": 1559033904863, "transaction": None},
}

MONGO_SOURCE = {
    "version": "2.7.0.Final", "connector": "mongodb", "name": "fulfillment",
    "ts_ms": 1558965508000, "snapshot": "false", "db": "inventory", "sequence": None,
    "rs": "rs0", "collection": "customers", "ord": 31, "lsid": None, "txnNumber": None,
}
MONGO_AFTER = '{"_id": 1004, "first_name": "Anne", "last_name": "Kretchmar"}'
MONGO_DOCUMENTED = {
    "c": {"after": MONGO_AFTER, "before": None, "source": MONGO_SOURCE, "op": "c",
          "ts_ms": 1558965515240, "transaction": None},
    "u": {"after": MONGO_AFTER.replace("Anne", "Anne Marie"), "before": None,
          "updateDescription": {"removedFields": None,
                                "updatedFields": '{"first_name": "Anne Marie"}',
                                "truncatedArrays": None},
          "source": MONGO_SOURCE, "op": "u", "ts_ms": 1465491461815, "transaction": None},
    "d": {"after": None, "before": None, "source": MONGO_SOURCE, "op": "d",
          "ts_ms": 1558965667432, "transaction": None},
}


def shape(value):
    """JSON types, recursively: what a consumer written for the documented event relies on."""
    if isinstance(value, dict):
        return {name: shape(item) for name, item in value.items()}
    if value is None:
        return None
    return {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), "?")


def same_shape(ours: dict, documented: dict, nullable: set[str] = frozenset()) -> None:
    ours, documented = json.loads(dumps(ours)), json.loads(json.dumps(documented))
    assert set(ours) == set(documented)
    assert set(ours["source"]) == set(documented["source"])
    for field, expected in shape(documented["source"]).items():
        if field not in nullable and expected is not None:
            assert shape(ours["source"][field]) == expected, field
    for field in ("op", "ts_ms"):
        assert shape(ours[field]) == shape(documented[field])


def pg_change(operation, new, old, *, snapshot=False, position="000000000170E3A8:00000002"):
    return Change(operation, "public.customers", new, old, {"id": 1}, position, COMMITTED,
                  555, snapshot)


PG_CHANGES = {
    "c": pg_change(Operation.INSERT, ROW, None),
    "u": pg_change(Operation.UPDATE, {**ROW, "first_name": "Anne Marie"}, {"id": 1}),
    "d": pg_change(Operation.DELETE, None, {"id": 1}),
    "r": pg_change(Operation.INSERT, ROW, None, snapshot=True, position="0000000000000000:1"),
}


@pytest.mark.parametrize("op", ["c", "u", "d", "r"])
def test_postgresql_envelopes_have_the_documented_shape(op):
    ours = envelope(PG_CHANGES[op], Source(name="PostgreSQL_server", database="postgres"),
                    now_ms=1559033904863)
    documented = PG_DOCUMENTED[op]
    same_shape(ours, documented, nullable={"lsn", "sequence"} if op == "r" else set())
    assert ours["op"] == op
    assert ours["before"] == documented["before"] and ours["after"] == documented["after"]
    source = ours["source"]
    assert source["snapshot"] == documented["source"]["snapshot"]
    assert (source["connector"], source["db"], source["schema"], source["table"]) == (
        "postgresql", "postgres", "public", "customers")
    assert source["ts_ms"] == int(COMMITTED.timestamp() * 1000)  # milliseconds, commit time
    assert source["txId"] == 555
    if op != "r":
        assert source["lsn"] == 0x170E3A8  # the commit LSN as an integer
        assert ours["transaction"] == {"id": "555:24175528", "total_order": 3,
                                       "data_collection_order": 3}


def test_postgresql_key_is_the_json_of_the_key_columns():
    assert dumps(key(PG_CHANGES["u"])) == b'{"id":1}'


def test_unavailable_toasted_values_get_debezium_s_placeholder_and_come_back():
    change = pg_change(Operation.UPDATE, {"id": 1, "body": UNCHANGED, "n": 2}, {"id": 1})
    ours = envelope(change)
    assert ours["after"] == {"id": 1, "body": UNAVAILABLE, "n": 2}
    assert change_from_debezium(json.loads(dumps(ours)), {"id": 1}).new == change.new


def test_full_old_rows_are_before_and_values_encode_as_changefeed_json():
    change = pg_change(Operation.UPDATE, {"id": 1, "price": Decimal("1.10")},
                       {"id": 1, "price": Decimal("1.00")})
    ours = json.loads(dumps(envelope(change)))
    assert ours["before"] == {"id": 1, "price": "1.00"} and ours["after"]["price"] == "1.10"


def test_data_collection_order_counts_per_table_within_a_transaction():
    encode = DebeziumEncoder()
    changes = [
        Change(Operation.INSERT, table, {"id": n}, None, {"id": n}, f"00000000000000AA:{i:08X}",
               COMMITTED, 7)
        for i, (table, n) in enumerate([("public.a", 1), ("public.b", 1), ("public.a", 2)])
    ]
    orders = [encode(c)["transaction"] for c in changes]
    assert [(t["total_order"], t["data_collection_order"]) for t in orders] == [
        (1, 1), (2, 1), (3, 2)]


def mongo_change(operation, new, old, meta=None, snapshot=False):
    position = {"_data": "8263F0"} if not snapshot else {"snapshot": 1, "done": True}
    return Change(operation, "inventory.customers", new, old, {"_id": 1004}, position,
                  COMMITTED, None, snapshot, meta)


MONGO_ROW = {"_id": 1004, "first_name": "Anne", "last_name": "Kretchmar"}
MONGO_CHANGES = {
    "c": mongo_change(Operation.INSERT, MONGO_ROW, None),
    "u": mongo_change(Operation.UPDATE, {**MONGO_ROW, "first_name": "Anne Marie"},
                      {"_id": 1004},
                      {"update_description": {"updated_fields": {"first_name": "Anne Marie"},
                                              "removed_fields": [], "truncated_arrays": []},
                       "new_source": "lookup"}),
    "d": mongo_change(Operation.DELETE, None, {"_id": 1004}),
}


@pytest.mark.parametrize("op", ["c", "u", "d"])
def test_mongodb_envelopes_have_the_documented_shape(op):
    ours = envelope(MONGO_CHANGES[op], Source(name="fulfillment"), now_ms=1558965515240)
    documented = MONGO_DOCUMENTED[op]
    same_shape(ours, documented, nullable={"rs", "ord"})
    assert ours["op"] == op
    for field in ("after", "before"):  # Extended JSON strings, as Debezium writes them
        if documented[field] is None:
            assert ours[field] is None
        else:
            assert json.loads(ours[field]) == json.loads(documented[field])
    if op == "u":
        ours_update = ours["updateDescription"]
        assert set(ours_update) == set(documented["updateDescription"])
        assert json.loads(ours_update["updatedFields"]) == {"first_name": "Anne Marie"}
    assert (ours["source"]["db"], ours["source"]["collection"]) == ("inventory", "customers")


def test_mongodb_snapshot_reads_are_r_and_the_last_one_says_so():
    ours = envelope(mongo_change(Operation.INSERT, MONGO_ROW, None, snapshot=True))
    assert ours["op"] == "r" and ours["source"]["snapshot"] == "last"


def test_mongodb_key_is_the_id_as_extended_json_and_reads_back():
    change = MONGO_CHANGES["u"]
    record_key = key(change)
    assert record_key == {"id": "1004"}
    back = change_from_debezium(json.loads(dumps(envelope(change))), record_key)
    assert (back.operation, back.table, back.key, back.new) == (
        Operation.UPDATE, "inventory.customers", {"_id": 1004}, change.new)


# -- for real ----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("sink", ["stdout", "file"])
def test_changefeed_run_format_debezium_on_postgresql(pg_dsn, pg, tmp_path, sink):
    pg.execute("CREATE TABLE customers (id int PRIMARY KEY, email text)")
    args = ["run", "customers", "--url", pg_dsn, "--format", "debezium", "-q"]
    assert run_cli(*args, "--until-idle", "0.5").returncode == 0  # creates the slot
    with pg.transaction():
        pg.execute("INSERT INTO customers VALUES (1, 'a@example.com')")
        xid = pg.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
    pg.execute("UPDATE customers SET email = 'b@example.com' WHERE id = 1")
    pg.execute("DELETE FROM customers WHERE id = 1")
    out = tmp_path / "events.jsonl"
    extra = ["--sink", str(out)] if sink == "file" else []
    result = run_cli(*args, "--limit", "3", *extra)
    assert result.returncode == 0, result.stderr
    lines = (out.read_text() if sink == "file" else result.stdout).splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["op"] for e in events] == ["c", "u", "d"]
    assert events[0]["after"] == {"id": 1, "email": "a@example.com"}
    assert events[1]["before"] is None and events[1]["after"]["email"] == "b@example.com"
    assert events[2]["before"] == {"id": 1} and events[2]["after"] is None
    source = events[0]["source"]
    assert source["connector"] == "postgresql" and source["txId"] == xid
    assert source["db"] == pg_dsn.rpartition("/")[2] and source["table"] == "customers"
    assert isinstance(source["lsn"], int) and source["lsn"] > 0
    lsns = [e["source"]["lsn"] for e in events]
    assert lsns == sorted(lsns) and len(set(lsns)) == 3  # three transactions, in commit order
    assert all(isinstance(e["ts_ms"], int) and isinstance(e["source"]["ts_ms"], int)
               for e in events)


@pytest.mark.live
def test_changefeed_run_format_debezium_on_mongodb(mongodb_server, tmp_path):
    import pymongo

    client = pymongo.MongoClient(mongodb_server.url, serverSelectionTimeoutMS=5000)
    collection = client["changefeed_test"][f"customers_{uuid.uuid4().hex[:8]}"]
    collection.insert_one({"_id": 0})
    checkpoint = str(tmp_path / "checkpoint.json")
    args = ["run", collection.full_name, "--url", mongodb_server.url, "--format", "debezium",
            "--checkpoint", checkpoint, "--prefeed", "snapshot", "-q"]
    try:
        snapshot = run_cli(*args, "--limit", "1")  # reads {"_id": 0}, then resumes from there
        assert snapshot.returncode == 0, snapshot.stderr
        [read] = [json.loads(line) for line in snapshot.stdout.splitlines()]
        assert read["op"] == "r" and read["source"]["snapshot"] == "last"
        collection.insert_one({"_id": 1004, "first_name": "Anne"})
        collection.update_one({"_id": 1004}, {"$set": {"first_name": "Anne Marie"}})
        collection.delete_one({"_id": 1004})
        result = run_cli(*args, "--limit", "3")
    finally:
        collection.drop()
        client.close()
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["op"] for e in events] == ["c", "u", "d"]
    assert json.loads(events[0]["after"]) == {"_id": 1004, "first_name": "Anne"}
    assert json.loads(events[1]["updateDescription"]["updatedFields"]) == {
        "first_name": "Anne Marie"}
    assert events[2]["after"] is None
    assert events[0]["source"]["connector"] == "mongodb"
    assert events[0]["source"]["collection"] == collection.name


@pytest.mark.parametrize(("url", "database"), [
    ("postgresql://app@db.internal:5432/shop", "shop"),
    ("postgres://app@db/shop?sslmode=require", "shop"),
    ("host=db dbname=shop user=app", "shop"),
    ("mongodb://127.0.0.1:27017/?replicaSet=rs0", None),
    ("rethinkdb://127.0.0.1:28015/test", None),
    ("", None),
])
def test_source_db_comes_from_a_postgresql_url_only(url, database):
    from changefeed.formats.debezium import database_of

    assert database_of(url) == database
