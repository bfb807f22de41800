"""How changes sit on a log (Redis stream entries, Kafka records), without a server: what the
sinks write is what the feeds read back."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from changefeed import UNCHANGED, ConfigurationError, Operation, PipelineError
from changefeed.errors import DecodeError
from changefeed.formats.records import (
    RecordEncoder,
    change_of_entry,
    change_of_record,
    read_back,
    stream_entry,
    topic_for,
)
from changefeed.testing import delete, insert, update

COMMITTED = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
UPDATE = update("public.tasks", {"id": 1, "body": UNCHANGED, "done": True},
                {"id": 1, "body": "long", "done": False}, key={"id": 1},
                position="0/16B3748:00000001", committed_at=COMMITTED, transaction=42,
                schema_version="a1b2c3d4e5f6")


def as_read(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    """The fields as redis-py returns them: bytes names."""
    return {name.encode(): value for name, value in fields.items()}


def test_a_stream_entry_gives_back_the_change():
    fields = stream_entry(UPDATE, "0/16B3748:00000001")
    assert orjson.loads(fields["position"]) == "0/16B3748:00000001"
    change = change_of_entry(as_read(fields))
    assert change is not None
    assert (change.operation, change.table, change.new, change.old, change.key) == (
        Operation.UPDATE, "public.tasks", {"id": 1, "body": UNCHANGED, "done": True},
        {"id": 1, "body": "long", "done": False}, {"id": 1})
    assert (change.position, change.committed_at, change.transaction, change.schema_version) == (
        "0/16B3748:00000001", COMMITTED, 42, "a1b2c3d4e5f6")


def test_a_trimmed_entry_holds_no_change():
    assert change_of_entry(None) is None and change_of_entry({}) is None


@pytest.mark.parametrize("value, problem", [
    (b"not json", "line 1 column 1"),
    (b'{"operation": "insert", ', "line 1 column"),  # cut short
    (b'{"type": "insert", "model": "T", "data": {}}', "not a change"),  # a delta
    (b'{"operation": "upsert", "table": "t"}', "not a change"),
    (b'{"operation": "insert"}', "not a change"),  # no table
    (b"[1, 2]", "not a change"),
])
def test_an_entry_that_holds_no_change_is_a_decode_error_naming_it(value, problem):
    with pytest.raises(DecodeError, match=f"s entry 1-0 is not a change record: .*{problem}") as e:
        change_of_entry({b"change": value, b"position": b"1"}, "s entry 1-0")
    assert "\n" not in str(e.value) and e.value.exit_code == 3


def test_a_change_read_back_is_at_the_log_position_and_remembers_its_source_position():
    change = read_back(UPDATE, "1714564800000-0")
    assert change.position == "1714564800000-0"
    assert change.meta == {"source_position": "0/16B3748:00000001"}
    assert (change.new, change.old, change.committed_at) == (UPDATE.new, UPDATE.old, COMMITTED)
    assert change.schema_version == "a1b2c3d4e5f6"


@pytest.mark.parametrize("template, table, topic", [
    ("{table}", "public.tasks", "public.tasks"),
    ("cdc.{schema}.{name}", "app.tasks", "cdc.app.tasks"),
    ("{name}", "tasks", "tasks"),
])
def test_topic_names(template, table, topic):
    assert topic_for(template, table) == topic


def test_a_table_name_that_is_no_topic_name_is_a_clear_error():
    with pytest.raises(PipelineError, match="'public.bad table' .* is not a Kafka topic name"):
        topic_for("{table}", "public.bad table")


@pytest.mark.parametrize("bad", ["{tabel}", "{0}", "{table"])
def test_a_bad_topic_template_is_refused_at_once(bad):
    with pytest.raises(ConfigurationError, match="bad topic template"):
        RecordEncoder(bad)


def test_an_unknown_format_is_refused():
    with pytest.raises(ConfigurationError, match="use one of change, delta, debezium"):
        RecordEncoder(fmt="avro")


def test_a_change_record_is_keyed_by_the_row_key_and_reads_back():
    [record] = RecordEncoder("cdc.{name}").records(UPDATE, 7)
    assert (record.topic, orjson.loads(record.key)) == ("cdc.tasks", {"id": 1})
    assert dict(record.headers) == {"operation": b"update", "table": b"public.tasks",
                                    "position": b"7", "format": b"change",
                                    "schema_version": b"a1b2c3d4e5f6"}
    change = change_of_record(record.value, record.key, record.headers, "t[0]@0")
    assert change is not None and (change.new, change.old, change.position) == (
        UPDATE.new, UPDATE.old, UPDATE.position)


def test_a_delta_record_cannot_be_read_back():
    [record] = RecordEncoder(fmt="delta", model="Task").records(insert("t", {"id": 1}), 1)
    assert orjson.loads(record.value) == {"type": "insert", "model": "Task", "data": {"id": 1}}
    assert record.key is None  # the change has no key
    with pytest.raises(DecodeError, match="t\\[0\\]@5 holds a 'delta' record"):
        change_of_record(record.value, record.key, record.headers, "t[0]@5")


def test_a_debezium_delete_is_followed_by_a_tombstone():
    gone = delete("public.tasks", {"id": 2}, key={"id": 2}, position="0/10:00000000")
    record, tombstone = RecordEncoder(fmt="debezium").records(gone, 3)
    assert orjson.loads(record.value)["op"] == "d" and orjson.loads(record.key) == {"id": 2}
    assert (tombstone.key, tombstone.value, tombstone.headers) == (record.key, None,
                                                                   record.headers)
    assert change_of_record(tombstone.value, tombstone.key, tombstone.headers, "t") is None
    change = change_of_record(record.value, record.key, record.headers, "t")
    assert change is not None and (change.operation, change.old, change.key) == (
        Operation.DELETE, {"id": 2}, {"id": 2})


def test_a_record_without_a_format_header_is_a_change():
    value = orjson.dumps(insert("t", {"id": 1}).to_dict())
    change = change_of_record(value, None, None, "t")
    assert change is not None and change.new == {"id": 1}


@pytest.mark.parametrize("value, fmt, problem", [
    (b"not json", b"change", "t is not a change record"),
    (b'{"type": "insert"}', b"change", "t is not a change record: not a change"),
    (b'{"op": "x"}', b"debezium", "t is not a debezium record"),
])
def test_a_record_that_is_not_what_it_says_is_a_clear_error(value, fmt, problem):
    with pytest.raises(DecodeError, match=problem):
        change_of_record(value, b'{"id": 1}', [("format", fmt)], "t")


@pytest.mark.parametrize("value, key, headers, problem", [
    (b'{"op": "c", "source": {"table": "t"}, "after": {"id": 1}}', b"{not a key",
     [("format", b"debezium")], "t is not a debezium record"),
    (b'{"op": "c", "source": "nowhere"}', None, [("format", b"debezium")],
     "t is not a debezium record: not a Debezium event"),
    (b'{"op": "c", "source": {"table": "t", "ts_ms": 1e300}}', None, [("format", b"debezium")],
     "t is not a debezium record: not a Debezium event"),
    (b'{"op": "c", "source": {"connector": "mongodb"},'
     b' "after": "{\\"_id\\": {\\"$oid\\": \\"zz\\"}}"}',  # no ObjectId
     None, [("format", b"debezium")], "t is not a debezium record: .* not a valid ObjectId"),
    (b"{}", None, [("format", b"avro")], "t holds a 'avro' record: .* change or debezium"),
    (b"{}", None, [("format", b"\xff")], "t holds a '\ufffd' record"),
    (b"[]", None, [], "t is not a change record: not a change"),
])
def test_every_undecodable_record_is_a_decode_error_of_one_line(value, key, headers, problem):
    with pytest.raises(DecodeError, match=problem) as failure:
        change_of_record(value, key, headers, "t")
    assert "\n" not in str(failure.value) and failure.value.exit_code == 3
