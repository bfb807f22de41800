"""The pgoutput decoder on messages recorded from a real PostgreSQL 15 (no server needed).

The recording comes from record_pgoutput.py; its workload is listed in the JSON file.
"""

import json
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from changefeed import UNCHANGED, Change, Operation
from changefeed.backends.postgres.pgoutput import (
    Begin,
    Commit,
    DecodeError,
    PgOutputDecoder,
    Truncate,
    format_lsn,
    make_position,
    parse_lsn,
    parse_position,
)

RECORDED = json.loads((Path(__file__).parent / "recorded" / "pgoutput.json").read_text())
MESSAGES = [bytes.fromhex(m) for m in RECORDED["messages"]]
KEYS = {"public.everything": ["id"], "public.keyed": ["a", "b"]}


def decode_all(operation=Operation.INSERT | Operation.UPDATE | Operation.DELETE, **options):
    decoder = PgOutputDecoder(operation, primary_keys=KEYS, **options)
    return [event for event in map(decoder.decode, MESSAGES) if event is not None]


def changes(**options):
    return [e for e in decode_all(**options) if isinstance(e, Change)]


def test_every_type_becomes_a_python_value():
    first = changes()[0]
    assert first.operation == Operation.INSERT and first.table == "public.everything"
    row = first.new
    assert row["id"] == 1 and row["i"] == 42
    assert row["b"] == 9007199254740993  # bigint beyond float precision stays exact
    assert row["n"] == Decimal("12345.678900") and isinstance(row["n"], Decimal)
    assert row["t"] == 'hé "quoted"'
    assert row["flag"] is True
    assert row["at"] == datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=timezone.utc)
    assert row["d"] == date(2024, 2, 29)
    assert row["u"] == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    assert row["j"] == {"k": [1, 2, {"x": None}]}
    assert row["arr"] == [1, None, 3]
    assert row["bin"] == b"\x00\xff\x10"
    assert row["m"] == "happy"  # an enum psycopg does not know stays text
    assert len(row["big"]) == 400 * 32
    assert first.old is None and first.key == {"id": 1}


def test_nulls_are_none():
    second = changes()[1]
    assert second.new["id"] == 2
    assert all(second.new[column] is None for column in second.new if column != "id")


def test_rows_of_one_transaction_share_the_commit_lsn_but_not_the_position():
    first, second = changes()[:2]
    begin = decode_all()[0]
    assert isinstance(begin, Begin)
    assert begin.final_lsn == 0x1511D90
    assert first.position == "0000000001511D90:00000000"  # literal: not make_position's echo
    assert second.position == "0000000001511D90:00000001"
    assert first.position < second.position
    assert first.transaction == second.transaction == begin.xid
    assert first.committed_at == begin.committed_at


def test_positions_increase_in_stream_order_as_strings():
    positions = [c.position for c in changes()]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_unchanged_toasted_column_is_the_unchanged_sentinel_never_none():
    update = changes()[2]
    assert update.operation == Operation.UPDATE
    assert update.new["i"] == 43
    assert update.new["big"] is UNCHANGED
    assert update.old == {"id": 1}  # REPLICA IDENTITY DEFAULT: the key only


def test_key_change_sends_the_old_key():
    update = changes()[3]
    assert update.new["id"] == 10 and update.old == {"id": 2} and update.key == {"id": 10}


def test_delete_under_default_identity_has_the_key_only():
    delete = changes()[4]
    assert delete.operation == Operation.DELETE
    assert delete.new is None and delete.old == {"id": 10} and delete.key == {"id": 10}


def test_replica_identity_full_sends_the_whole_old_row_and_keys_come_from_the_primary_key():
    insert, update, delete = changes()[5:8]
    assert insert.key == {"a": 1, "b": "x"}
    assert update.old == {"a": 1, "b": "x", "note": "first"}
    assert update.new == {"a": 1, "b": "x", "note": "second"}
    assert delete.old == {"a": 1, "b": "x", "note": "second"}


def test_commit_carries_the_end_lsn_to_acknowledge():
    events = decode_all()
    commits = [e for e in events if isinstance(e, Commit)]
    begins = [e for e in events if isinstance(e, Begin)]
    assert [c.commit_lsn for c in commits] == [b.final_lsn for b in begins]
    assert all(c.end_lsn > c.commit_lsn for c in commits)


def test_truncate_is_reported_not_turned_into_deletes():
    truncates = [e for e in decode_all() if isinstance(e, Truncate)]
    assert truncates == [Truncate(("public.keyed",), cascade=False, restart_identity=False)]


@pytest.mark.parametrize("mask", range(1, 8))
def test_operation_mask_filters_but_positions_stay_the_same(mask):
    everything = changes()
    filtered = changes(operation=mask)
    assert filtered == [c for c in everything if c.operation & mask]


def test_table_filter():
    only_keyed = changes(tables=["public.keyed"])
    assert {c.table for c in only_keyed} == {"public.keyed"} and len(only_keyed) == 3


def test_row_change_before_its_relation_is_an_error():
    decoder = PgOutputDecoder()
    insert = next(m for m in MESSAGES if m[:1] == b"I")
    with pytest.raises(DecodeError, match="before its Relation"):
        decoder.decode(insert)


def test_unknown_message_type_is_an_error():
    with pytest.raises(DecodeError, match="unknown pgoutput message"):
        PgOutputDecoder().decode(b"Z\x00")


def test_lsn_and_position_formats_round_trip():
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert make_position(0x16B374D848, 7) == "00000016B374D848:00000007"
    assert parse_position("00000016B374D848:00000007") == (0x16B374D848, 7)
    assert make_position(1, 2) < make_position(1, 10) < make_position(1, 16) < make_position(2, 0)


def test_generated_row_decoders_agree_with_the_plain_loop():
    import random
    import struct

    from changefeed import UNCHANGED
    from changefeed.backends.postgres.pgoutput import _parse_tuple_loop, _row_decoder

    rng = random.Random(5)
    for _ in range(300):
        ncolumns = rng.randint(1, 40)
        parts = []
        for _ in range(ncolumns):
            kind = rng.choice("tnu")
            if kind == "t":
                value = bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))
                parts.append(b"t" + struct.pack("!i", len(value)) + value)
            else:
                parts.append(kind.encode())
        data = b"xx" + struct.pack("!h", ncolumns) + b"".join(parts) + b"tail"
        raw, offset, unchanged = _parse_tuple_loop(data, 4, ncolumns)
        assert data[offset:] == b"tail" and len(raw) == ncolumns

        columns = tuple(f"c{i}" for i in range(ncolumns))
        key_names = tuple(rng.sample(columns, rng.randint(0, min(3, ncolumns))))
        row, key, decoded_offset, names = _row_decoder("t", columns, key_names, list)(data, 2)
        assert decoded_offset == offset
        assert key == {name: row[name] for name in key_names}
        assert names == (None if unchanged is None else [columns[i] for i in unchanged])
        assert row == {
            column: UNCHANGED if unchanged and i in unchanged else raw[i]
            for i, column in enumerate(columns)
        }


def test_unknown_tuple_value_kind_and_wrong_column_count_are_errors():
    from changefeed.backends.postgres.pgoutput import _row_decoder

    decode = _row_decoder("public.t", ("a",), ("a",), list)
    with pytest.raises(DecodeError, match="unknown tuple value kind 'b'"):
        decode(b"\x00\x01b\x00\x00\x00\x01x", 0)
    with pytest.raises(DecodeError, match="public.t: tuple has 2 columns, relation 1"):
        decode(b"\x00\x02nn", 0)
