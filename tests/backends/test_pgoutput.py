"""The pgoutput decoder on messages recorded from a real PostgreSQL 15 (no server needed).

The recording comes from record_pgoutput.py; its workload is listed in the JSON file.
"""

import json
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from changefeed import ALL, UNCHANGED, Change, Operation, Truncate
from changefeed.backends.postgres.pgoutput import (
    Begin,
    Commit,
    PgOutputDecoder,
    Truncated,
)
from changefeed.backends.postgres.position import make_position, parse_position
from changefeed.backends.postgres.protocol import format_lsn, parse_lsn
from changefeed.backends.postgres.tuples import row_decoder
from changefeed.errors import DecodeError

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


def test_truncate_is_an_item_of_its_own_positioned_like_a_change_not_deletes():
    events = decode_all(ALL)
    (truncated,) = [e for e in events if isinstance(e, Truncated)]
    begin = events[events.index(truncated) - 1]
    assert isinstance(begin, Begin)  # TRUNCATE keyed, alone in its transaction
    assert truncated.tables == ("public.keyed",)
    assert truncated.items == (Truncate(
        "public.keyed", make_position(begin.final_lsn, 0), begin.committed_at, begin.xid,
        cascade=False, restart_identity=False),)
    assert not [e for e in events if isinstance(e, Change) and e.table == "public.keyed"
                and e.operation is Operation.DELETE and e.position > truncated.items[0].position]


def test_a_truncate_left_out_by_the_mask_still_names_its_tables():
    (truncated,) = [e for e in decode_all() if isinstance(e, Truncated)]
    assert truncated.items == () and truncated.tables == ("public.keyed",)


@pytest.mark.parametrize("mask", range(1, 16))
def test_operation_mask_filters_but_positions_stay_the_same(mask):
    everything = [e for e in decode_all(ALL) if isinstance(e, Change)]
    filtered = changes(operation=mask)
    assert filtered == [c for c in everything if c.operation & mask]
    truncates = [t for e in decode_all(mask) if isinstance(e, Truncated) for t in e.items]
    assert truncates == [t for e in decode_all(ALL) if isinstance(e, Truncated) for t in e.items
                         if t.operation & mask]


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


def parse_tuple_loop(data, offset, ncolumns):
    """TupleData parsed by a plain loop: the reference the generated decoders must agree with."""
    import struct

    raw, unchanged = [], None
    for index in range(ncolumns):
        kind = data[offset]
        if kind == 116:  # 't'
            start = offset + 5
            offset = start + struct.unpack_from("!i", data, offset + 1)[0]
            raw.append(data[start:offset])
        elif kind in (110, 117):  # 'n', 'u'
            offset += 1
            raw.append(None)
            if kind == 117:
                unchanged = (unchanged or []) + [index]
        else:
            raise DecodeError(f"unknown tuple value kind {chr(kind)!r}")
    return raw, offset, unchanged


def test_generated_row_decoders_agree_with_the_plain_loop():
    import random
    import struct

    from changefeed import UNCHANGED

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
        raw, offset, unchanged = parse_tuple_loop(data, 4, ncolumns)
        assert data[offset:] == b"tail" and len(raw) == ncolumns

        columns = tuple(f"c{i}" for i in range(ncolumns))
        key_names = tuple(rng.sample(columns, rng.randint(0, min(3, ncolumns))))
        row, key, decoded_offset, names = row_decoder("t", columns, key_names, list)(data, 2)
        assert decoded_offset == offset
        assert key == {name: row[name] for name in key_names}
        assert names == (None if unchanged is None else [columns[i] for i in unchanged])
        assert row == {
            column: UNCHANGED if unchanged and i in unchanged else raw[i]
            for i, column in enumerate(columns)
        }


def test_unknown_tuple_value_kind_and_wrong_column_count_are_errors():

    decode = row_decoder("public.t", ("a",), ("a",), list)
    with pytest.raises(DecodeError, match="unknown tuple value kind 'b'"):
        decode(b"\x00\x01b\x00\x00\x00\x01x", 0)
    with pytest.raises(DecodeError, match="public.t: tuple has 2 columns, relation 1"):
        decode(b"\x00\x02nn", 0)


def _tuple(*values):
    import struct

    return struct.pack("!h", len(values)) + b"".join(
        b"n" if v is None else b"t" + struct.pack("!i", len(v)) + v for v in values
    )


def test_a_value_python_cannot_hold_keeps_its_text_and_the_rest_of_the_row_its_values():
    from changefeed.backends.postgres.loading import TypeLoaders
    from changefeed.backends.postgres.values import Interval, PostgresText

    oids = [23, 1082, 1083, 1184, 1114, 1266, 3802, 1186, 1182, 25]
    columns = tuple(f"c{i}" for i in range(len(oids)))
    loaders = TypeLoaders()
    decode = row_decoder("t", columns, ("c0",), loaders(oids), loaders.rescue(oids))
    ordinary = [b"1", b"2024-02-29", b"12:00:00", b"2024-01-01 00:00:00+00",
                b"2024-01-01 00:00:00", b"12:00:00+02", b"{}", b"1 day", b"{2020-01-01}", b"x"]
    row, key, _, _ = decode(_tuple(*ordinary), 0)
    assert row["c1"] == date(2024, 2, 29) and row["c7"] == Interval(0, 1, 0)
    assert key == {"c0": 1}
    for column, text in [(1, b"infinity"), (1, b"-infinity"), (1, b"4713-01-01 BC"),
                         (1, b"10000-01-01"), (2, b"24:00:00"), (3, b"infinity"),
                         (3, b"0001-01-01 00:00:00+00 BC"), (4, b"294276-12-31 23:59:59"),
                         (5, b"24:00:00+00")]:
        values = list(ordinary)
        values[column] = text
        row, _, _, _ = decode(_tuple(*values), 0)
        assert isinstance(row[f"c{column}"], PostgresText) and row[f"c{column}"] == text.decode()
        # the value only, not the row: every other column is loaded as usual
        assert row["c1" if column != 1 else "c3"] in (date(2024, 2, 29), datetime(
            2024, 1, 1, tzinfo=timezone.utc))
        assert row["c0"] == 1 and row["c7"] == Interval(0, 1, 0) and row["c9"] == "x"
    values = list(ordinary)
    values[8] = b"{2020-01-01,infinity,NULL}"
    row, _, _, _ = decode(_tuple(*values), 0)
    assert row["c8"] == [date(2020, 1, 1), "infinity", None]
    assert row["c8"][1].type == "date"


@pytest.mark.parametrize("text,special", [
    (b"NaN", True), (b"Infinity", True), (b"-Infinity", True),
    (b"1.5", False), (b"-0", False), (b"1e+308", False), (b"-1.7976931348623157e+308", False),
])
def test_floats_non_finite_are_told_apart_in_every_position(text, special):
    import math

    from changefeed.backends.postgres.loading import TypeLoaders
    from changefeed.backends.postgres.values import NonFiniteFloat

    oids = [701, 700, 1022, 25]
    loaders = TypeLoaders()
    decode = row_decoder("t", ("a", "b", "c", "d"), (), loaders(oids), loaders.rescue(oids))
    row, _, _, _ = decode(_tuple(text, b"2", b"{" + text + b",NULL}", b"NaN"), 0)
    expected = float(text)
    for value in (row["a"], row["c"][0]):
        assert isinstance(value, NonFiniteFloat) is special
        assert value == expected or (math.isnan(value) and math.isnan(expected))
    assert type(row["b"]) is float and row["d"] == "NaN"  # a text "NaN" is just text


def test_without_a_rescue_a_loader_error_stands():

    def failing(raw):
        raise ValueError("cannot load")

    with pytest.raises(ValueError, match="cannot load"):
        row_decoder("t", ("a",), (), failing)(_tuple(b"x"), 0)


@pytest.mark.parametrize("text,value,iso", [
    ("00:00:00", (0, 0, 0), "PT0S"),
    ("1 mon", (1, 0, 0), "P1M"),
    ("1 year 2 mons 3 days 04:05:06.789", (14, 3, 14_706_789_000), "P1Y2M3DT4H5M6.789S"),
    ("-1 years -2 mons +3 days -04:05:06", (-14, 3, -14_706_000_000), "P-1Y-2M3DT-4H-5M-6S"),
    ("-00:00:00.5", (0, 0, -500_000), "PT-0.5S"),
    ("2562047788:00:54.775807", (0, 0, 2**63 - 1), "PT2562047788H54.775807S"),
    ("-178000000 years", (-2_136_000_000, 0, 0), "P-178000000Y"),
])
def test_intervals_parse_and_print_as_postgres_does(text, value, iso):
    from changefeed.backends.postgres.loading import TypeLoaders
    from changefeed.backends.postgres.values import Interval

    (loaded,) = TypeLoaders()([1186])([text.encode()])
    assert loaded == Interval(*value) and loaded.isoformat() == iso


def test_json_numbers_python_cannot_parse_as_int_keep_their_digits():
    from changefeed.backends.postgres.loading import TypeLoaders
    from changefeed.backends.postgres.values import JsonDecimal
    from changefeed.formats.codec import dumps

    digits = "9" * 5000  # beyond Python's int parsing limit; jsonb accepts it
    text = '{"n": ' + digits + ',\n "s": "a\\nb"}'
    (value,) = TypeLoaders()([3802])([text.encode()])
    assert value == {"n": JsonDecimal(digits), "s": "a\nb"}
    assert dumps({"j": value}) == b'{"j":{"n":' + digits.encode() + b',"s":"a\\nb"}}'


def test_json_too_deep_for_python_keeps_the_exact_text_on_one_line():
    from changefeed.backends.postgres.loading import TypeLoaders
    from changefeed.backends.postgres.values import RawJson
    from changefeed.formats.codec import dumps

    text = "[" * 300 + '{"s": "a\\nb",\n "n": 1.10}' + "]" * 300
    (value,) = TypeLoaders()([114])([text.encode()])
    assert isinstance(value, RawJson) and value == text and value.type == "json"
    assert dumps({"j": value}) == ('{"j":' + text.replace("\n", " ") + "}").encode()
