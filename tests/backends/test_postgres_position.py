"""`PgPosition`: the PostgreSQL position type, without a server.

Its text is what JSON lines, checkpoint files and Kafka/Redis headers held before it was a type,
so those tests write the expected text out literally."""

from __future__ import annotations

import pickle

import orjson
import pytest

from changefeed.backends.postgres.position import PgPosition, TransactionPositions
from changefeed.change import Change, Operation
from changefeed.checkpoint import FileCheckpoint


@pytest.mark.parametrize("lsn, index, text", [
    (0x16B3748, 2, "00000000016B3748:00000002"),
    (0, 0, "0000000000000000:00000000"),
    (0x1_0000_0000, 4096, "0000000100000000:00001000"),
    (2**64 - 1, 2**32 - 1, "FFFFFFFFFFFFFFFF:FFFFFFFF"),
])
def test_a_position_is_its_text_and_gives_its_numbers_back(lsn, index, text):
    position = PgPosition(lsn, index)
    assert isinstance(position, str) and position == text and hash(position) == hash(text)
    assert (position.lsn, position.index) == (lsn, index)
    assert PgPosition.parse(text) == position and type(PgPosition.parse(text)) is PgPosition


@pytest.mark.parametrize("text, canonical", [
    ("16b3748:2", "00000000016B3748:00000002"),  # lower case, short: as a hand-made checkpoint
    ("00000000016B3748", "00000000016B3748:00000000"),
    ("0:0", "0000000000000000:00000000"),
])
def test_parse_gives_the_canonical_text(text, canonical):
    assert PgPosition.parse(text) == canonical


@pytest.mark.parametrize("value", [
    "", "p1", "0/16B3748", "16B3748:", ":2", "1:2:3", "00000000016B3748:000000002",
    "10000000000000000:0", " 16B3748:2", 7, None, {"not": "ours"},
])
def test_what_is_not_a_position(value):
    with pytest.raises(ValueError):
        PgPosition.parse(value)
    assert PgPosition.of(value) is None


@pytest.mark.parametrize("lsn, index", [(-1, 0), (0, -1), (2**64, 0), (0, 2**32)])
def test_numbers_out_of_range_are_refused(lsn, index):
    with pytest.raises(ValueError):
        PgPosition(lsn, index)


def test_of_keeps_a_position_and_reads_text():
    position = PgPosition(0xA0, 1)
    assert PgPosition.of(position) is position
    assert PgPosition.of("00000000000000a0:00000001") == position


@pytest.mark.parametrize("lsn", [0, 0x16B3748, 2**64 - 1])
def test_a_transaction_s_positions_in_order_whatever_their_index(lsn):
    positions = TransactionPositions()
    positions.begin(lsn)
    taken = [positions.take() for _ in range(4100)]
    positions.count += 3  # changes not handed out still take their index
    taken.append(positions.take())
    indexes = [*range(4100), 4103]
    for start in (0x10000, 0xABCDEF, 0xFFFFFE, 0xFFFFFFFE):  # made in other ways
        positions.count = start
        taken += [positions.take(), positions.take()]
        indexes += [start, start + 1]
    assert taken == [PgPosition(lsn, index) for index in indexes]
    assert all(type(position) is PgPosition for position in taken)
    assert [(p.lsn, p.index) for p in taken[4094:4098]] == [(lsn, i) for i in range(4094, 4098)]
    assert sorted(taken) == taken
    positions.begin(lsn + 1 if lsn < 2**64 - 1 else 0)
    assert positions.take().index == 0


def test_positions_order_as_numbers_where_text_of_other_widths_would_not():
    pairs = [(0x9, 0xFFFF), (0xA, 0), (0xFF, 9), (0xFF, 0xA), (0x100, 0), (2**32, 0)]
    positions = [PgPosition(lsn, index) for lsn, index in pairs]
    assert sorted(positions, key=lambda p: (p.lsn, p.index)) == sorted(positions) == positions


def test_json_pickle_and_checkpoints_hold_the_same_text(tmp_path):
    position = PgPosition(0x16B3748, 2)
    text = "00000000016B3748:00000002"
    assert orjson.dumps({"position": position}) == orjson.dumps({"position": text})
    change = Change(Operation.INSERT, "public.t", {"id": 1}, None, {"id": 1}, position)
    assert orjson.loads(orjson.dumps(change.to_dict()))["position"] == text  # no encoder hook
    again = pickle.loads(pickle.dumps(position))
    assert type(again) is PgPosition and again == text
    FileCheckpoint(tmp_path / "a.json").save("feed", position)
    FileCheckpoint(tmp_path / "b.json").save("feed", text)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert FileCheckpoint(tmp_path / "a.json").load("feed") == text
