"""Acknowledgement and positions without a server: `ChangeFeed.ack`, `ThrottledAcks`, the
PostgreSQL position format, and the decoder's positions in transactions of hundreds of rows.

Expected positions are written out literally: comparing with `make_position` would pass
whatever format it had.
"""

from __future__ import annotations

import struct
import time

import pytest

from changefeed import MemoryCheckpoint, Operation
from changefeed.backends.postgres.pgoutput import (
    Begin,
    Commit,
    PgOutputDecoder,
)
from changefeed.backends.postgres.position import make_position, parse_position
from changefeed.backends.postgres.protocol import format_lsn, parse_lsn
from changefeed.delivery import ThrottledAcks
from changefeed.testing import MemoryFeed, insert


class CountingCheckpoint(MemoryCheckpoint):
    def __init__(self) -> None:
        super().__init__()
        self.saves: list[tuple[str, object]] = []

    def save(self, feed_id, position) -> None:
        self.saves.append((feed_id, position))
        super().save(feed_id, position)


class RecordingFeed(MemoryFeed):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.told: list[object] = []

    def on_acknowledge(self, position) -> None:
        self.told.append(position)


# -- ChangeFeed.ack ------------------------------------------------------------------------------


def test_ack_saves_under_the_feed_id_and_tells_the_backend():
    checkpoint = CountingCheckpoint()
    feed = RecordingFeed("t", checkpoint=checkpoint, name="my-feed")
    feed.ack(7)
    feed.ack(9)
    assert checkpoint.saves == [("my-feed", 7), ("my-feed", 9)]
    assert feed.told == [7, 9]
    assert feed.acknowledged == 9
    # A new feed object starts from what was saved.
    assert RecordingFeed("t", checkpoint=checkpoint, name="my-feed").acknowledged == 9


def test_ack_of_none_changes_nothing():
    checkpoint = CountingCheckpoint()
    feed = RecordingFeed("t", checkpoint=checkpoint)
    feed.ack(3)
    feed.ack(None)
    assert checkpoint.saves == [("t", 3)] and feed.told == [3]
    assert feed.acknowledged == 3


def test_iterating_acknowledges_a_change_only_when_the_next_is_asked_for():
    checkpoint = CountingCheckpoint()
    feed = MemoryFeed("t", changes=[insert("t", {"id": n}) for n in (1, 2, 3)],
                      checkpoint=checkpoint)
    iterator = iter(feed)
    assert next(iterator).position == 1
    assert checkpoint.saves == []  # handed out, not yet delivered
    assert next(iterator).position == 2
    assert checkpoint.saves == [("t", 1)]
    assert next(iterator).position == 3
    assert checkpoint.saves == [("t", 1), ("t", 2)]  # the last is never taken as delivered


# -- ThrottledAcks -------------------------------------------------------------------------------


def throttled(interval: float, *, just_acked: bool) -> tuple[ThrottledAcks, CountingCheckpoint]:
    checkpoint = CountingCheckpoint()
    acks = ThrottledAcks(MemoryFeed("t", checkpoint=checkpoint), interval)
    if just_acked:
        acks.last = time.monotonic()  # as right after an acknowledgement
    return acks, checkpoint


def test_throttled_acks_acknowledge_at_once_when_the_interval_has_passed():
    acks, checkpoint = throttled(0.0, just_acked=False)
    acks.delivered("p1")
    acks.delivered("p2")
    assert checkpoint.saves == [("t", "p1"), ("t", "p2")]
    acks.delivered(None)  # nothing new delivered: nothing to acknowledge again
    acks.delivered(None, final=True)
    assert checkpoint.saves == [("t", "p1"), ("t", "p2")]


def test_throttled_acks_hold_the_latest_position_until_the_interval_passes():
    acks, checkpoint = throttled(3600.0, just_acked=True)
    acks.delivered("p1")
    acks.delivered("p2")
    acks.delivered(None)
    assert checkpoint.saves == []  # within the interval: held back
    acks.last -= 3600.0  # the interval has passed
    acks.delivered(None)
    assert checkpoint.saves == [("t", "p2")]  # the latest, once
    acks.delivered("p3")
    assert checkpoint.saves == [("t", "p2")]  # a new interval began with that acknowledgement


@pytest.mark.parametrize("last", [None, "p3"])
def test_a_final_delivery_is_acknowledged_whatever_the_interval(last):
    acks, checkpoint = throttled(3600.0, just_acked=True)
    acks.delivered("p1")
    acks.delivered("p2")
    acks.delivered(last, final=True)
    assert checkpoint.saves == [("t", last or "p2")]
    acks.delivered(None, final=True)  # nothing pending any more
    assert checkpoint.saves == [("t", last or "p2")]


def test_the_first_delivery_is_acknowledged_at_once():
    acks, checkpoint = throttled(0.2, just_acked=False)
    acks.delivered("p1")
    assert checkpoint.saves == [("t", "p1")]


# -- PostgreSQL positions ----------------------------------------------------------------------


@pytest.mark.parametrize("lsn, index, expected", [
    (0x16B3748, 2, "00000000016B3748:00000002"),
    (0x16B3748, 0, "00000000016B3748:00000000"),
    (0x16B3748, 9, "00000000016B3748:00000009"),
    (0x16B3748, 10, "00000000016B3748:0000000A"),
    (0x16B3748, 15, "00000000016B3748:0000000F"),
    (0x16B3748, 16, "00000000016B3748:00000010"),
    (0x16B3748, 255, "00000000016B3748:000000FF"),
    (0x16B3748, 256, "00000000016B3748:00000100"),
    (0x16B3748, 1_000_000, "00000000016B3748:000F4240"),
    (0, 0, "0000000000000000:00000000"),
    (0x16B374D848, 7, "00000016B374D848:00000007"),
    (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF, "FFFFFFFFFFFFFFFF:FFFFFFFF"),
])
def test_position_format(lsn, index, expected):
    assert make_position(lsn, index) == expected
    assert parse_position(expected) == (lsn, index)


def test_position_without_an_index_parses_as_index_zero():
    assert parse_position("00000000016B3748") == (0x16B3748, 0)


def test_positions_order_as_strings_exactly_as_lsn_then_index():
    pairs = [(lsn, index) for lsn in (0x9, 0x10, 0xFF, 0x100, 0x1_0000_0000)
             for index in (0, 1, 9, 10, 15, 16, 17, 255, 256, 4096)]
    positions = [make_position(lsn, index) for lsn, index in pairs]
    assert sorted(positions) == positions  # pairs are listed in numeric order
    assert len(set(positions)) == len(positions)


@pytest.mark.parametrize("lsn, text", [
    (0, "0/0"),
    (0x16B374D848, "16/B374D848"),
    (0x1_0000_0000, "1/0"),
    (0xFFFFFFFF, "0/FFFFFFFF"),
    (0x1_0000_000A, "1/A"),
    (0xFFFFFFFFFFFFFFFF, "FFFFFFFF/FFFFFFFF"),
])
def test_lsn_text_format(lsn, text):
    assert format_lsn(lsn) == text
    assert parse_lsn(text) == lsn
    assert parse_lsn(text.lower()) == lsn


# -- the decoder's positions in a big transaction (pgoutput bytes built by hand) -----------------


def _cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def relation_message(oid: int, schema: str, name: str) -> bytes:
    """A Relation message for ``schema.name (id int4 key, note text)``."""
    columns = b"".join(
        bytes([flags]) + _cstring(column) + struct.pack("!Ii", type_oid, -1)
        for flags, column, type_oid in ((1, "id", 23), (0, "note", 25))
    )
    return b"R" + struct.pack("!I", oid) + _cstring(schema) + _cstring(name) + b"d" + \
        struct.pack("!h", 2) + columns


def _tuple(*values: str) -> bytes:
    return struct.pack("!h", len(values)) + b"".join(
        b"t" + struct.pack("!i", len(v.encode())) + v.encode() for v in values
    )


def insert_message(oid: int, key: int) -> bytes:
    return b"I" + struct.pack("!I", oid) + b"N" + _tuple(str(key), f"row {key}")


def update_message(oid: int, key: int) -> bytes:
    return b"U" + struct.pack("!I", oid) + b"N" + _tuple(str(key), "changed")


def delete_message(oid: int, key: int) -> bytes:
    return b"D" + struct.pack("!I", oid) + b"K" + _tuple(str(key), "")


def begin_message(final_lsn: int, xid: int) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, 0, xid)


def commit_message(commit_lsn: int, end_lsn: int) -> bytes:
    return b"C" + struct.pack("!BQQq", 0, commit_lsn, end_lsn, 0)


def transaction(final_lsn: int, rows: list[bytes]) -> list[bytes]:
    return [begin_message(final_lsn, 700), *rows, commit_message(final_lsn, final_lsn + 0x28)]


def decode(messages: list[bytes], operation=Operation.INSERT | Operation.UPDATE |
           Operation.DELETE):
    decoder = PgOutputDecoder(operation, primary_keys={"public.t": ["id"]})
    return [e for e in map(decoder.decode, messages) if e is not None]


def test_positions_of_a_300_row_transaction():
    messages = [relation_message(16384, "public", "t")]
    messages += transaction(0x16B3748, [insert_message(16384, n) for n in range(300)])
    events = decode(messages)
    assert isinstance(events[0], Begin) and isinstance(events[-1], Commit)
    assert events[-1].end_lsn == 0x16B3770
    changes = events[1:-1]
    assert [c.key["id"] for c in changes] == list(range(300))
    positions = [c.position for c in changes]
    assert positions[:3] == ["00000000016B3748:00000000", "00000000016B3748:00000001",
                             "00000000016B3748:00000002"]
    assert positions[15:18] == ["00000000016B3748:0000000F", "00000000016B3748:00000010",
                                "00000000016B3748:00000011"]
    assert positions[254:258] == ["00000000016B3748:000000FE", "00000000016B3748:000000FF",
                                  "00000000016B3748:00000100", "00000000016B3748:00000101"]
    assert positions[-1] == "00000000016B3748:0000012B"
    assert sorted(positions) == positions and len(set(positions)) == 300


def test_each_transaction_numbers_its_rows_from_zero_under_its_own_commit_lsn():
    messages = [relation_message(16384, "public", "t")]
    messages += transaction(0xFFFF_FFF0, [insert_message(16384, n) for n in range(20)])
    messages += transaction(0x1_0000_0100, [insert_message(16384, n) for n in range(20, 22)])
    positions = [e.position for e in decode(messages) if not isinstance(e, (Begin, Commit))]
    assert positions[19] == "00000000FFFFFFF0:00000013"
    assert positions[20:] == ["0000000100000100:00000000", "0000000100000100:00000001"]
    assert sorted(positions) == positions


@pytest.mark.parametrize("operation", [Operation.INSERT, Operation.UPDATE, Operation.DELETE,
                                       Operation.UPDATE | Operation.DELETE])
def test_positions_count_every_row_change_whatever_the_mask(operation):
    # Filtered-out changes still take their index, so a position means the same row for any
    # mask, and a feed whose mask changes does not skip or repeat rows after a restart.
    rows = []
    for n in range(18):
        rows += [insert_message(16384, n), update_message(16384, n), delete_message(16384, n)]
    messages = [relation_message(16384, "public", "t"), *transaction(0x2000, rows)]
    got = {(e.operation, e.key["id"]): e.position for e in decode(messages, operation)
           if not isinstance(e, (Begin, Commit))}
    kinds = (Operation.INSERT, Operation.UPDATE, Operation.DELETE)
    expected = {(kind, n): f"0000000000002000:{3 * n + offset:08X}"
                for n in range(18) for offset, kind in enumerate(kinds) if kind & operation}
    assert got == expected
    if operation & Operation.DELETE:
        assert got[(Operation.DELETE, 17)] == "0000000000002000:00000035"  # the 54th change


def test_throttled_acks_with_nothing_delivered_acknowledge_nothing():
    acks, checkpoint = throttled(0.0, just_acked=False)
    acks.delivered(None)
    acks.delivered(None, final=True)
    assert checkpoint.saves == []


def test_throttled_acks_acknowledge_once_exactly_the_interval_has_passed(monkeypatch):
    acks, checkpoint = throttled(0.25, just_acked=False)
    monkeypatch.setattr(time, "monotonic", lambda: 100.0)
    acks.last = 99.875  # an eighth of a second ago: too soon
    acks.delivered("p1")
    assert checkpoint.saves == []
    acks.last = 99.75  # exactly the interval ago
    acks.delivered(None)
    assert checkpoint.saves == [("t", "p1")] and acks.last == 100.0


@pytest.mark.parametrize("mask, names", [
    (Operation.INSERT, ["insert"]),
    (Operation.DELETE, ["delete"]),
    (Operation.UPDATE, ["update"]),
    (Operation.INSERT | Operation.UPDATE, ["insert", "update"]),
    (Operation.DELETE | Operation.UPDATE, ["delete", "update"]),
    (Operation.INSERT | Operation.DELETE | Operation.UPDATE, ["insert", "delete", "update"]),
    (Operation(0), []),
])
def test_operation_names_are_what_a_publication_publishes(mask, names):
    assert mask.names == names
