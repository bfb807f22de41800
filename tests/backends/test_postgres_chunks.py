"""Chunked back-fills without a server: a closed window's snapshot changes, the requests and
progress records, and `Backfills`' state from watermark to acknowledgement.

Reading a chunk and writing its watermark need a server (test_postgres_backfill.py); here the
window a chunk read would open is built by hand."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from changefeed.backends.postgres.backfill import Backfills, backfill_states
from changefeed.backends.postgres.chunks import (
    BACKFILL_PREFIX,
    WATERMARK_PREFIX,
    ChunkWindow,
    TableBackfill,
    requested_tables,
    window_changes,
)
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.position import TransactionPositions
from changefeed.backends.postgres.tables import Table, WatchedTables
from changefeed.change import Change, Operation, SnapshotState
from changefeed.message import Message


def backfill(oid: int = 10, table: str = "public.t", key: tuple[str, ...] = ("id",)):
    return TableBackfill(oid, table, list(key), ["integer"] * len(key))


def window(rows: dict, *, complete: bool, of: TableBackfill | None = None, mark: str = "w1"):
    return ChunkWindow(of or backfill(), mark, rows, ["9"], complete=complete)


@pytest.mark.parametrize("markers", [False, True])
@pytest.mark.parametrize("complete", [False, True])
def test_a_closed_window_s_rows_come_out_positioned_in_the_watermark_s_transaction(
    markers, complete
):
    rows = {(1,): {"id": 1, "v": "a"}, (2,): {"id": 2, "v": "b"}}
    positions = TransactionPositions(0x500)
    positions.count = 3  # the watermark's transaction had three changes before it
    closed = window(rows, complete=complete)
    out, last = window_changes(closed, "app.t", "v1", positions.take, markers=markers)
    changes = [item for item in out if isinstance(item, Change)]
    assert [c.new for c in changes] == list(rows.values())
    assert all(c.snapshot and c.operation == Operation.INSERT and c.schema_version == "v1"
               and c.table == "app.t" for c in changes)
    assert [c.key for c in changes] == [{"id": 1}, {"id": 2}]
    states = [(item.state, item.table) for item in out if isinstance(item, SnapshotState)]
    assert states == ([("started", "app.t")] + [("done", "app.t")] * complete if markers else [])
    assert [item.position.index for item in out] == list(range(3, 3 + len(out)))
    assert last == out[-1].position and closed.backfill.announced
    again, _ = window_changes(window({}, complete=False, of=closed.backfill), "app.t", "v1",
                              positions.take, markers=markers)
    assert again == []  # "started" is said once


def test_a_window_left_with_no_row_gives_no_change_and_no_position():
    out, last = window_changes(window({}, complete=False), "t", None,
                               TransactionPositions(1).take, markers=False)
    assert (out, last) == ([], None)


@pytest.mark.parametrize("content, expected", [
    (b'{"slot": "s", "tables": [10, 11]}', [10, 11]),
    (b'{"slot": "other", "tables": [10]}', []),
    (b'{"slot": "s"}', []),
    (b'[10]', []),
    (b"not json", []),
])
def test_a_backfill_request_names_its_slot(content, expected):
    assert requested_tables(content, "s") == expected


def test_which_tables_still_need_their_snapshot():
    tables = [Table(oid, "public", f"t{oid}", "r", ["id"]) for oid in (1, 2, 3)]
    meta = {"backfill": {"1": "done", "2": {"after": ["5"], "done": 5, "chunks": 1}}}
    assert [(t.oid, state) for t, state in backfill_states(meta, tables)] == [
        (2, {"after": ["5"], "done": 5, "chunks": 1}), (3, None)]
    legacy = {"snapshot": "done", "backfill": {"3": {"after": None, "done": 0, "chunks": 0}}}
    assert [t.oid for t, _ in backfill_states(legacy, tables)] == [3]


def test_a_chunk_query_continues_after_the_last_key_done():
    table = backfill(key=("a", "b"))
    assert table.chunk_query(Table(10, "public", "t", "r").identifier, 100).as_string(
        None
    ) == ('SELECT ARRAY["a"::text, "b"::text]::text[] AS __changefeed_key, t.*'
          ' FROM "public"."t" t ORDER BY "a", "b" LIMIT 100')
    table.after = ["3", "x"]
    assert ' WHERE ("a", "b") > (\'3\'::integer, \'x\'::integer) ORDER BY' in (
        table.chunk_query(Table(10, "public", "t", "r").identifier, 100).as_string(None))


def watched(*oids: int) -> WatchedTables:
    tables = WatchedTables()
    tables.by_oid = {oid: Table(oid, "public", f"t{oid}", "r", ["id"]) for oid in oids}
    tables.stream_names = {oid: f"public.t{oid}" for oid in oids}
    return tables


def backfills_of(tables: WatchedTables, save=lambda states: None) -> Backfills:
    """Back-fills of slot ``s`` whose chunk reads would need a server (none happens here)."""
    return Backfills("s", tables, no_connection, chunk_size=2, markers=False, save=save)


def no_connection():
    raise AssertionError("no server here")


def watermark(mark: str, slot: str = "s") -> Message:
    content = json.dumps({"slot": slot, "id": mark, "mark": "high"}).encode()
    return Message(WATERMARK_PREFIX, content, None)


def decoder(lsn: int = 0x500):
    positions = TransactionPositions(lsn)
    return SimpleNamespace(relations={10: SimpleNamespace(schema_version="v1")},
                           next_position=positions.take)


def test_backfills_from_watermark_to_the_recorded_chunk():
    saved = []
    backfills = backfills_of(watched(10), lambda states: saved.append(copy.deepcopy(states)))
    table = backfill(table="public.t10")
    backfills.start(table)
    assert backfills.due and backfills.observer == backfills.observe
    backfills.window = window({(1,): {"id": 1}, (2,): {"id": 2}}, complete=False, of=table)
    assert not backfills.due
    backfills.observe(Change(Operation.UPDATE, "public.t10", {"id": 2}, {"id": 2}, {"id": 2}))
    assert backfills.on_message(watermark("other"), decoder()) == []  # a lost window's
    assert backfills.on_message(watermark("w1", slot="t"), decoder()) == []  # another feed's
    out = backfills.on_message(watermark("w1"), decoder())
    assert [c.new for c in out] == [{"id": 1}]  # the stream changed row 2 inside the window
    assert backfills.due and table.after == ["9"]  # the next chunk starts after this one
    backfills.committed(0x508)
    ledger = AckLedger()
    backfills.confirmed(ledger)
    assert saved == []  # its row is not acknowledged yet
    ledger.acknowledge(out[-1].position)
    backfills.confirmed(ledger)
    assert saved == [{"10": {"after": ["9"], "done": 1, "chunks": 1}}]
    assert not backfills.finished


def test_a_chunk_without_rows_is_recorded_once_the_slot_passes_its_watermark():
    saved = []
    backfills = backfills_of(watched(10), saved.append)
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.window = window({}, complete=True, of=table)
    assert backfills.on_message(watermark("w1"), decoder()) == []
    assert not backfills.queue and backfills.observer is None
    ledger = AckLedger()
    backfills.confirmed(ledger)
    assert saved == []  # its transaction's end is not known yet
    backfills.committed(0x508)
    ledger.commit(None, 0x508)
    backfills.confirmed(ledger)
    assert saved == [{"10": "done"}]


def test_a_reconnect_loses_the_open_window_and_unrecorded_chunks():
    backfills = backfills_of(watched(10))
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.window = window({(1,): {"id": 1}}, complete=True, of=table)
    backfills.on_message(watermark("w1"), decoder())
    assert not backfills.queue
    backfills.reset()
    assert list(backfills.queue) == [table] and table.after is None  # from the recorded state
    assert backfills.window is None and not backfills.finished


def test_a_request_for_a_table_without_a_key_is_refused_with_a_warning(caplog):
    tables = watched(10)
    tables.by_oid[10].key = []
    backfills = backfills_of(tables)
    request = Message(BACKFILL_PREFIX, b'{"slot": "s", "tables": [10, 99]}', None)
    assert backfills.on_message(request, decoder()) == []
    assert not backfills.queue and "no primary key" in caplog.text
