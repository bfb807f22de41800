"""Chunked back-fills without a server: a closed window's snapshot changes, the requests and
progress records, and `Backfills`' state from watermark to acknowledgement.

Reading a chunk and writing its watermark need a server (test_postgres_backfill.py); here the
window a chunk read would open is built by hand."""

from __future__ import annotations

import copy
import json
import sys
from datetime import date
from decimal import Decimal
from types import SimpleNamespace
from uuid import UUID

import pytest
from psycopg import sql

from changefeed.backends.postgres import backfill as backfill_module
from changefeed.backends.postgres.backfill import Backfills, backfill_states
from changefeed.backends.postgres.backfill_reads import _adapt_pages
from changefeed.backends.postgres.chunks import (
    BACKFILL_PREFIX,
    WATERMARK_PREFIX,
    ChunkWindow,
    Leaf,
    TableBackfill,
    key_token,
    next_ctid_chunk,
    pages_for,
    parse_tid,
    requested_tables,
    window_changes,
)
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.position import TransactionPositions
from changefeed.backends.postgres.snapshot import row_bytes
from changefeed.backends.postgres.tables import Table, WatchedTables
from changefeed.change import UNCHANGED, Change, Operation, SnapshotState
from changefeed.message import Message


def backfill(oid: int = 10, table: str = "public.t", key: tuple[str, ...] = ("id",)):
    return TableBackfill(oid, table, list(key), ["integer"] * len(key))


def window(rows: list, *, complete: bool, of: TableBackfill | None = None, mark: str = "w1"):
    return ChunkWindow(of or backfill(), mark, rows, ["9"], complete=complete)


def kept_rows(window: ChunkWindow) -> list:
    return [window.rows[index] for index in window.kept()]


@pytest.mark.parametrize("markers", [False, True])
@pytest.mark.parametrize("complete", [False, True])
def test_a_closed_window_s_rows_come_out_positioned_in_the_watermark_s_transaction(
    markers, complete
):
    rows = [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]
    positions = TransactionPositions(0x500)
    positions.count = 3  # the watermark's transaction had three changes before it
    closed = window(rows, complete=complete)
    out, last = window_changes(closed, "app.t", "v1", positions.take, markers=markers)
    changes = [item for item in out if isinstance(item, Change)]
    assert [c.new for c in changes] == rows
    assert all(c.snapshot and c.operation == Operation.INSERT and c.schema_version == "v1"
               and c.table == "app.t" for c in changes)
    assert [c.key for c in changes] == [{"id": 1}, {"id": 2}]
    states = [(item.state, item.table) for item in out if isinstance(item, SnapshotState)]
    assert states == ([("started", "app.t")] + [("done", "app.t")] * complete if markers else [])
    assert [item.position.index for item in out] == list(range(3, 3 + len(out)))
    assert last == out[-1].position and closed.backfill.announced
    again, _ = window_changes(window([], complete=False, of=closed.backfill), "app.t", "v1",
                              positions.take, markers=markers)
    assert again == []  # "started" is said once


def test_a_window_left_with_no_row_gives_no_change_and_no_position():
    out, last = window_changes(window([], complete=False), "t", None,
                               TransactionPositions(1).take, markers=False)
    assert (out, last) == ([], None)


@pytest.mark.parametrize("content, expected", [
    (b'{"slot": "s", "tables": [10, 11]}', [10, 11]),
    (b'{"slot": "other", "tables": [10]}', []),
    (b'{"slot": "s"}', []),
    (b'[10]', []),
    (b"not json", []),
    (b'{"slot": "s", "tables": [10, [11], "12", 1.5, true, null, 99999999999999999999999]}', [10]),
    (b'{"slot": "s", "tables": {"10": 1}}', []),
    (b'{"slot": "s", "tables": ' + b"[" * 5000 + b"]" * 5000 + b"}", []),
    (b"[" * 50_000 + b"]" * 50_000, []),
])
def test_a_backfill_request_names_its_slot(content, expected):
    assert requested_tables(content, "s") == expected


def test_which_tables_still_need_their_snapshot():
    tables = [Table(oid, "public", f"t{oid}", "r", ["id"]) for oid in (1, 2, 3)]
    partition = {"after": None, "done": 0, "chunks": 0, "root": 1}
    meta = {"backfill": {"1": "done", "2": {"after": ["5"], "done": 5, "chunks": 1},
                         "7": partition, "8": {"after": None, "root": 99}}}
    assert [(t.oid, source, state) for t, source, state in backfill_states(meta, tables)] == [
        (2, 2, {"after": ["5"], "done": 5, "chunks": 1}), (3, 3, None), (1, 7, partition)]
    legacy = {"snapshot": "done", "backfill": {"3": {"after": None, "done": 0, "chunks": 0}}}
    assert [t.oid for t, _, _ in backfill_states(legacy, tables)] == [3]


def test_a_chunk_query_continues_after_the_last_key_done():
    table = backfill(key=("a", "b"))
    identifier = Table(10, "public", "t", "r").identifier
    assert table.chunk_query(identifier, ["a", "b", "v"], 100).as_string(None) == (
        'SELECT t."a", t."b", t."v" FROM "public"."t" t ORDER BY "a", "b" LIMIT 100')
    table.after = ["3", "x"]
    assert table.chunk_query(identifier, ["a", "v"], 100, ["b"]).as_string(None) == (
        'SELECT t."b"::text AS "__changefeed_key_0", t."a", t."v" FROM'
        ' "public"."t" t WHERE ("a", "b") > (\'3\'::integer, \'x\'::integer)'
        ' ORDER BY "a", "b" LIMIT 100')


def test_a_ctid_chunk_query_reads_one_leaf_between_two_ctids():
    table = backfill(key=())
    assert table.ctid_query(Table(10, "public", "t", "r").identifier, ["v", "w"], "(3,7)", 9,
                            50).as_string(None) == (
        'SELECT t.ctid::text AS __changefeed_key, t."v", t."w" FROM ONLY "public"."t" t'
        " WHERE t.ctid > '(3,7)'::tid AND t.ctid < '(9,0)'::tid ORDER BY t.ctid LIMIT 50")
    # The whole range, unsorted (a TID range scan; ORDER BY would sort it).
    assert table.ctid_query(Table(10, "public", "t", "r").identifier, ["v"], "(3,0)", 9,
                            None).as_string(None) == (
        'SELECT t.ctid::text AS __changefeed_key, t."v" FROM ONLY "public"."t" t'
        " WHERE t.ctid > '(3,0)'::tid AND t.ctid < '(9,0)'::tid")


def leaf(oid: int, pages: int, storage: int = 1) -> Leaf:
    return Leaf(oid, Table(oid, "public", f"p{oid}", "r").identifier, storage, pages)


def test_a_table_without_key_is_read_leaf_after_leaf_by_pages():
    table = backfill(key=())
    leaves = [leaf(5, 3), leaf(7, 0), leaf(9, 2)]
    chunk = next_ctid_chunk(table, leaves, 2)
    assert (chunk.leaf.oid, chunk.after, chunk.upper, chunk.last) == (5, "(0,0)", 2, False)
    table.after = ["5", "(1,4)"]  # stopped inside the range (a full chunk)
    chunk = next_ctid_chunk(table, leaves, 2)
    assert (chunk.leaf.oid, chunk.after, chunk.upper) == (5, "(1,4)", 3)
    table.after = ["5", "(3,0)"]  # the leaf is read: the empty one is passed too
    chunk = next_ctid_chunk(table, leaves, 2)
    assert (chunk.leaf.oid, chunk.after, chunk.upper, chunk.last) == (9, "(0,0)", 2, True)
    table.after = ["9", "(2,0)"]
    assert next_ctid_chunk(table, leaves, 2) is None
    table.after = ["6", "(1,1)"]  # leaf 6 was detached meanwhile: on with the next ones
    assert next_ctid_chunk(table, leaves, 2).leaf.oid == 9


@pytest.mark.parametrize("pages, upper", [(0, 1), (1, 1), (2, 2), (7, 7)])
def test_a_single_leaf_is_read_from_its_first_page_at_least_a_page_at_a_time(pages, upper):
    table = backfill(key=())
    chunk = next_ctid_chunk(table, [leaf(5, 9, storage=4)], pages)
    assert (chunk.leaf.oid, chunk.after, chunk.upper, chunk.last) == (5, "(0,0)", upper, True)
    assert (table.after, table.storage) == (["5", "(0,0)"], 4)
    table.after = ["5", "(3,2)"]
    assert next_ctid_chunk(table, [leaf(5, 9, storage=4)], pages).upper == 3 + upper


def test_a_leaf_rewritten_meanwhile_is_read_again_from_its_first_page():
    table = backfill(key=())
    table.after, table.storage = ["5", "(40,2)"], 1
    chunk = next_ctid_chunk(table, [leaf(5, 100, storage=2)], 10)
    assert (chunk.after, chunk.upper, table.storage) == ("(0,0)", 10, 2)


@pytest.mark.parametrize("a, b", [
    ((1, "x"), (1, "x")),
    ((float("nan"),), (float("nan"),)),
    ((Decimal("NaN"),), (Decimal("NaN"),)),
    (([1, [2]], {"a": [1]}), ([1, [2]], {"a": [1]})),
    ((b"\x00" * 10,), (b"\x00" * 10,)),
    ((Decimal("1.50"), date(2020, 1, 2), UUID(int=7)), (Decimal("1.5"), date(2020, 1, 2),
                                                       UUID(int=7))),
    (([float("nan"), {"k": (Decimal("NaN"),)}],), ([float("nan"), {"k": [Decimal("NaN")]}],)),
    ((bytearray(b"ab"), True), (bytearray(b"ab"), True)),
])
def test_key_tokens_are_equal_exactly_when_the_values_are(a, b):
    assert key_token(a) == key_token(b) and hash(key_token(a)) == hash(key_token(b))


@pytest.mark.parametrize("a, b", [
    ((1,), (2,)), ((1.0,), (2.0,)), (([1],), ([2],)), (({"a": 1},), ({"a": 2},)),
    ((None,), (0,)), ((-1,), (-2,)), ((Decimal("1.5"),), (Decimal("1.6"),)),
    ((date(2020, 1, 2),), (date(2020, 1, 3),)), (({"a": 1},), ({"b": 1},)),
    ((bytearray(b"ab"),), (bytearray(b"ac"),)), ((["x"],), ("x",)),
])
def test_key_tokens_of_different_values_differ(a, b):
    assert key_token(a) != key_token(b)


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
    backfills.window = window([{"id": 1}, {"id": 2}], complete=False, of=table)
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
    backfills.window = window([], complete=True, of=table)
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
    backfills.window = window([{"id": 1}], complete=True, of=table)
    backfills.on_message(watermark("w1"), decoder())
    assert not backfills.queue
    backfills.reset()
    assert list(backfills.queue) == [table] and table.after is None  # from the recorded state
    assert backfills.window is None and not backfills.finished


def test_a_request_for_a_table_without_a_key_reads_it_by_ctid(caplog):
    tables = watched(10)
    tables.by_oid[10].key = []
    backfills = backfills_of(tables)
    backfills.connection = lambda: SimpleNamespace(execute=lambda *a: SimpleNamespace(
        fetchall=lambda: []))  # key_types of no key column
    request = Message(BACKFILL_PREFIX, b'{"slot": "s", "tables": [10, 99]}', None)
    assert backfills.on_message(request, decoder()) == []
    assert [b.by_ctid for b in backfills.queue] == [True]


def test_a_chunk_acknowledged_after_the_next_was_handed_out_records_its_own_last_key():
    saved = []
    backfills = backfills_of(watched(10), lambda states: saved.append(copy.deepcopy(states)))
    table = backfill(table="public.t10")
    backfills.start(table)
    firsts = []
    for mark, last, lsn in (("w1", ["2"], 0x500), ("w2", ["4"], 0x600)):  # none acked
        backfills.window = ChunkWindow(table, mark, [{"id": 1}], last, complete=False)
        out = backfills.on_message(watermark(mark), decoder(lsn))
        backfills.committed(lsn + 8)
        firsts.append(out[-1].position)
    assert table.after == ["4"]
    ledger = AckLedger()
    backfills.confirmed(ledger)
    assert saved == []  # nothing acknowledged: nothing recorded
    ledger.acknowledge(firsts[0])  # the first chunk, late
    backfills.confirmed(ledger)
    assert saved == [{"10": {"after": ["2"], "done": 1, "chunks": 1}}]
    backfills.reset()  # a crash now: the second chunk is read again
    assert table.after == ["2"] and list(backfills.queue) == [table]


def test_a_back_fill_s_recorded_state_says_where_it_stands():
    table = backfill(key=())
    assert table.by_ctid and table.source == 10
    assert table.state() == {"after": None, "done": 0, "chunks": 0}
    table.after, table.storage, table.done, table.chunks = ["10", "(3,0)"], 77, 5, 1
    assert table.state() == {"after": ["10", "(3,0)"], "done": 5, "chunks": 1, "storage": 77}
    partition = TableBackfill(10, "public.t", ["id"], ["integer"], source=12)
    assert partition.state() == {"after": None, "done": 0, "chunks": 0, "root": 10}
    assert not partition.by_ctid


def test_the_key_of_a_row_is_its_key_columns_or_the_whole_row():
    row = {"id": 1, "v": [1, 2], "w": None}
    assert backfill(key=("id",)).key_of(row) == {"id": 1}
    assert backfill(key=("v", "id")).key_of(row) == {"v": [1, 2], "id": 1}
    assert backfill(key=()).key_of(row) == row and backfill(key=()).key_of(row) is not row
    assert backfill(key=("id",)).token(row) == key_token((1,))
    assert backfill(key=()).token(row) == key_token((1, [1, 2], None))
    assert backfill(key=()).token(row) != backfill(key=()).token({**row, "w": 0})


@pytest.mark.parametrize("text, tid", [("(0,0)", (0, 0)), ("(12,7)", (12, 7)),
                                       ("(4294967295,65535)", (4294967295, 65535))])
def test_tids_are_read_back(text, tid):
    assert parse_tid(text) == tid


@pytest.mark.parametrize("text", ["", "(1)", "1,2", "(a,1)", "(1,2) "])
def test_anything_else_is_no_tid(text):
    with pytest.raises(ValueError):
        parse_tid(text)


@pytest.mark.parametrize("rows_per_page, chunk, pages", [
    (0, 100, 1), (-1, 100, 1), (50.0, 100, 2), (50.0, 101, 3), (200.0, 100, 1),
    (0.001, 10_000, 1 << 20),
])
def test_pages_for_a_chunk(rows_per_page, chunk, pages):
    assert pages_for(rows_per_page, chunk) == pages


@pytest.mark.parametrize("pages, found, whole, from_page_start, expected", [
    (4, 100, False, True, 3),    # more than a chunk in the range (read twice): fewer pages
    (1, 100, False, False, 1),   # at least one
    (4, 0, True, True, 32),      # nothing in 4 pages: 8 times more
    (4, 0, True, False, 32),
    (1 << 20, 0, True, True, 1 << 20),  # at most a million pages
    (4, 10, True, True, 32),     # 2.5 rows a page, 100 wanted: 40 pages, at most 8 times more
    (4, 50, True, True, 8),      # 12.5 rows a page: 8 pages
    (4, 99, True, True, 4),      # 24.75 rows a page: 4 pages hold 99, 5 would hold 124
    (1, 185, True, True, 1),
    (1, 60, True, True, 1),      # 60 rows a page: 1 page (2 would hold 120)
    (4, 60, True, False, 4),     # its first page read in part: no measure, the same
])
def test_pages_adapt_to_the_rows_found(pages, found, whole, from_page_start, expected):
    # private: the I/O module's one pure rule, tested here without a server
    assert _adapt_pages(pages, found, 100, whole, from_page_start) == expected


def test_row_bytes_counts_text_and_bytes_and_guesses_the_rest():
    rows = [{"a": "xyz", "b": b"\x00" * 10, "n": 5, "j": {"k": 1}, "z": None},
            {"a": None, "b": b"", "n": None, "j": {"k": 2}, "z": None}]
    size = row_bytes(rows)
    assert size == 3 + 10 + 16 * 2 + 2 * sys.getsizeof({"k": 1}) + 16 * 2
    assert row_bytes([]) == 0
    assert row_bytes([{"a": "x" * 1000}]) > row_bytes([{"a": "x"}]) + 900
    assert row_bytes([{"a": None}, {"a": "late text"}]) == 9  # typed by its first value


def test_a_change_of_a_table_being_back_filled_takes_its_key_out_of_the_window():
    backfills = backfills_of(watched(10, 11))
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.window = window([{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}], complete=False,
                              of=table)
    backfills.observe(Change(Operation.UPDATE, "public.t10", {"id": 2}, {"id": 2}, {"id": 2}))
    # A key changed: the old key's row is stale too.
    backfills.observe(Change(Operation.UPDATE, "public.t10", {"id": 9}, {"id": 3}, {"id": 9}))
    backfills.observe(Change(Operation.DELETE, "public.t10", None, {"id": 4}, {"id": 4}))
    backfills.observe(Change(Operation.INSERT, "public.t11", {"id": 1}, None, {"id": 1}))
    assert kept_rows(backfills.window) == [{"id": 1}] and backfills.window.count == 1
    assert [(table, key) for _, table, keys, _ in backfills.recent for key in keys] == [
        ("public.t10", key) for key in ((2,), (2,), (9,), (3,), (4,), (4,))]


def update(table: str, key: int, *, old_key: int | None = None, toasted_left_out: bool = True,
           v: int = 1):
    """An UPDATE as pgoutput gives it under the default replica identity: the old key only
    when the key changed, an unchanged TOASTed value as `UNCHANGED`."""
    new = {"id": key, "v": v, "body": UNCHANGED if toasted_left_out else "new"}
    old = {"id": old_key} if old_key is not None else None
    return Change(Operation.UPDATE, table, new, old, {"id": key})


def close(backfills: Backfills, mark: str) -> list:
    """The window of ``mark`` closes at its watermark: the items it hands out."""
    return list(backfills.on_message(watermark(mark), decoder()))


def confirm_all(backfills: Backfills, out: list) -> None:
    backfills.committed(0x508)
    ledger = AckLedger()
    for item in out:
        ledger.acknowledge(item.position)
    backfills.confirmed(ledger)


def docs(*keys: int) -> list[dict]:
    return [{"id": key, "v": 0, "body": f"body {key}"} for key in keys]


def test_rows_taken_out_for_updates_that_left_a_toasted_value_out_come_out_whole():
    # The stream's update stands for a row the consumer never had in full (the chunk was to
    # bring it), without its TOASTed value: the window makes the row whole from the chunk's
    # row (the value did not change while it was open). A row given a new key is read again
    # by key, and the chunk recorded only once that read is acknowledged.
    saved = []
    backfills = backfills_of(watched(10), lambda states: saved.append(copy.deepcopy(states)))
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.window = ChunkWindow(table, "w1", docs(1, 2, 3, 4, 5, 6), ["6"], complete=False)
    backfills.observe(update("public.t10", 2))                          # made whole
    backfills.observe(update("public.t10", 3, toasted_left_out=False))  # whole in the stream
    backfills.observe(update("public.t10", 40))                         # not in the chunk
    backfills.observe(update("public.t10", 30, old_key=4))  # a new key: its row read again
    backfills.observe(update("public.t10", 4, old_key=90))  # to a key the chunk had
    backfills.observe(update("public.t10", 6, v=7))
    backfills.observe(Change(Operation.DELETE, "public.t10", None, {"id": 6}, {"id": 6}))
    assert table.reread == {(30,): {"id": 30}, (4,): {"id": 4}}
    out = close(backfills, "w1")
    assert [change.new for change in out] == [
        {"id": 1, "v": 0, "body": "body 1"}, {"id": 2, "v": 1, "body": "body 2"},
        {"id": 5, "v": 0, "body": "body 5"}]
    assert list(table.reread) == [(30,), (4,)] and table.after == ["6"]
    assert backfills.due and backfills.queue[0] is table
    confirm_all(backfills, out)
    assert saved == []  # not recorded: a feed cut short now reads the chunk again
    # The rows read again (key 30 is gone meanwhile), in a window of their own; the stream
    # changes one of them again, leaving its TOASTed value out again.
    backfills.window = ChunkWindow(table, "w2", [{"id": 4, "v": 1, "body": "body 90"}],
                                   table.after, complete=False, rereads=((30,), (4,)))
    backfills.observe(update("public.t10", 4, v=2))
    out = close(backfills, "w2")
    assert [(change.new, change.snapshot) for change in out] == [
        ({"id": 4, "v": 2, "body": "body 90"}, True)]
    assert table.reread == {}
    confirm_all(backfills, out)
    assert saved == [{"10": {"after": ["6"], "done": 4, "chunks": 2}}]


def test_a_row_s_values_come_from_the_stream_s_changes_in_the_window_over_the_chunk_s_row():
    backfills = backfills_of(watched(10))
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.window = ChunkWindow(table, "w1", docs(1, 2, 3), ["3"], complete=False)
    backfills.observe(update("public.t10", 1, toasted_left_out=False))  # body "new"
    backfills.observe(update("public.t10", 1, v=5))  # left out: the one given before
    backfills.observe(Change(Operation.DELETE, "public.t10", None, {"id": 2}, {"id": 2}))
    backfills.observe(Change(Operation.INSERT, "public.t10", {"id": 2, "v": 9, "body": "b"},
                             None, {"id": 2}))
    backfills.observe(update("public.t10", 2, v=10))
    out = close(backfills, "w1")
    # 1 and 2 are whole in the stream already: nothing more of them.
    assert [change.new for change in out] == [{"id": 3, "v": 0, "body": "body 3"}]
    assert table.reread == {}


def test_a_row_the_window_cannot_make_whole_is_read_again():
    backfills = backfills_of(watched(10))
    table = backfill(table="public.t10")
    backfills.start(table)
    rows = [{"id": 1, "v": 0}, {"id": 2, "v": 0, "body": "b"}, {"id": 2, "v": 0, "body": "c"}]
    backfills.window = ChunkWindow(table, "w1", rows, ["2"], complete=False)
    backfills.observe(update("public.t10", 1))  # a column the chunk did not read
    backfills.observe(update("public.t10", 2))  # a key the chunk read twice
    assert close(backfills, "w1") == []
    assert table.reread == {(1,): {"id": 1}, (2,): {"id": 2}}
    assert backfills.finished[-1].record is False


def test_a_row_moved_to_a_key_another_row_had_in_the_window_is_read_again():
    backfills = backfills_of(watched(10))
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.window = ChunkWindow(table, "w1", docs(1, 2, 3, 5), ["5"], complete=False)
    backfills.observe(Change(Operation.DELETE, "public.t10", None, {"id": 5}, {"id": 5}))
    backfills.observe(update("public.t10", 5, old_key=9))  # the chunk's 5 may be either row
    backfills.observe(update("public.t10", 2, toasted_left_out=False))
    backfills.observe(update("public.t10", 3, old_key=2))  # the body given just before
    table.reread.clear()  # (`observe` reads every such move again: here, the window's own)
    out = close(backfills, "w1")
    assert [change.new["id"] for change in out] == [1]
    assert table.reread == {(5,): {"id": 5}}


@pytest.mark.parametrize("markers", [False, True])
def test_a_table_whose_last_chunk_has_rows_to_read_again_is_done_after_them(markers):
    backfills = backfills_of(watched(10))
    backfills.markers = markers
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.window = ChunkWindow(table, "w1", docs(1, 2), ["2"], complete=True)
    backfills.observe(update("public.t10", 9, old_key=2))
    out = close(backfills, "w1")
    assert [type(item).__name__ for item in out] == ["SnapshotState"] * markers + ["Change"]
    assert backfills.queue[0] is table and backfills.observer is not None  # still watched
    assert table.complete_after_reread and not backfills.finished[-1].complete
    backfills.window = ChunkWindow(table, "w2", [{"id": 9, "v": 1, "body": "body 2"}],
                                   table.after, complete=table.complete_after_reread,
                                   rereads=((9,),))
    out = close(backfills, "w2")
    assert [(type(item).__name__, getattr(item, "state", None)) for item in out] == [
        ("Change", None), *[("SnapshotState", "done")] * markers]
    assert not backfills.queue and backfills.finished[-1].complete


def test_a_change_the_stream_gave_just_before_a_chunk_s_read_is_applied_to_it(monkeypatch):
    backfills = backfills_of(watched(10))
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.observe(update("public.t10", 2))   # before the chunk's SELECT
    backfills.observe(update("public.t10", 50))  # the chunk will not have it
    chunk = ChunkWindow(table, "w1", docs(1, 2), ["2"], complete=False)
    monkeypatch.setattr(backfills, "connection", lambda: None)
    monkeypatch.setattr(backfills, "_read_chunk", lambda conn, of: chunk)
    monkeypatch.setattr(backfills, "_emit", lambda conn, mark, kind: None)
    backfills.open_chunk()
    assert backfills.window is chunk and kept_rows(chunk) == docs(1)
    assert [change.new for change in close(backfills, "w1")] == [
        {"id": 1, "v": 0, "body": "body 1"}, {"id": 2, "v": 1, "body": "body 2"}]


def test_keys_to_read_again_become_one_query_with_each_value_cast_to_its_column_type():
    table = TableBackfill(10, "public.t", ["a", "b"], ["integer", "text"])
    query = table.keys_query(sql.SQL("public.t"), ["a", "b", "body"],
                             [{"a": 1, "b": "it's"}, {"a": 2, "b": "x"}], ["b"])
    assert query.as_string(None) == (
        'SELECT t."b"::text AS "__changefeed_key_0", t."a", t."b", t."body" FROM public.t t'
        " WHERE (t.\"a\", t.\"b\") IN ((1::integer, 'it''s'::text), (2::integer, 'x'::text))")


def test_a_renamed_table_s_back_fill_goes_on_under_its_new_name():
    backfills = backfills_of(watched(10))
    table = backfill(table="public.t10")
    backfills.start(table)
    backfills.renamed(10, "app.t10")
    assert table.table == "app.t10" and backfills.observer is not None
    backfills.window = window([{"id": 1}], complete=False, of=table)
    backfills.observe(Change(Operation.DELETE, "app.t10", None, {"id": 1}, {"id": 1}))
    assert kept_rows(backfills.window) == [] and backfills.window.count == 0


def test_starting_a_back_fill_again_replaces_the_one_queued():
    backfills = backfills_of(watched(10, 11))
    first, other, again = backfill(10), backfill(11, "public.t11"), backfill(10)
    for each in (first, other, again):
        backfills.start(each)
    assert list(backfills.queue) == [other, again]
    assert backfills.states == {"10": again.state(), "11": other.state()}


def test_a_partition_s_back_fill_is_forgotten_once_done():
    saved = []
    backfills = backfills_of(watched(10), lambda states: saved.append(copy.deepcopy(states)))
    partition = TableBackfill(10, "public.t10", ["id"], ["integer"], source=12, markers=False)
    backfills.start(partition)
    assert backfills.states == {"12": {"after": None, "done": 0, "chunks": 0, "root": 10}}
    backfills.window = ChunkWindow(partition, "w1", [{"id": 1}], ["1"], complete=True)
    out = backfills.on_message(watermark("w1"), decoder())
    assert [type(item).__name__ for item in out] == ["Change"]  # no markers for a partition
    backfills.committed(0x508)
    ledger = AckLedger()
    ledger.acknowledge(out[-1].position)
    backfills.confirmed(ledger)
    assert saved == [{}] and not backfills.busy


def test_keys_the_stream_gave_are_kept_a_second_for_the_next_chunk_then_forgotten(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(backfill_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    backfills = backfills_of(watched(10))
    backfills.start(backfill(table="public.t10"))

    def change_at(moment: float, key: int) -> None:
        now[0] = moment
        backfills.observe(Change(Operation.INSERT, "public.t10", {"id": key}, None, {"id": key}))

    def kept() -> list[tuple]:
        return [key for _, _, keys, _ in backfills.recent for key in keys]

    change_at(100.0, 1)
    change_at(100.5, 2)
    change_at(101.2, 3)
    assert kept() == [(2,), (3,)]  # key 1 is older than a second
    change_at(105.0, 4)
    assert kept() == [(4,)]
    change_at(105.9, 5)
    assert kept() == [(4,), (5,)]


def test_a_table_whose_last_chunk_is_out_is_no_longer_watched_and_the_others_are():
    backfills = backfills_of(watched(10, 11))
    first, second = backfill(10, "public.t10"), backfill(11, "public.t11")
    backfills.start(first)
    backfills.start(second)
    backfills.window = ChunkWindow(first, "w1", [{"id": 1}], ["1"], complete=True)
    out = backfills.on_message(watermark("w1"), decoder())
    assert [(c.table, c.new, c.schema_version) for c in out] == [("public.t10", {"id": 1}, "v1")]
    backfills.observe(Change(Operation.INSERT, "public.t10", {"id": 7}, None, {"id": 7}))
    backfills.observe(Change(Operation.INSERT, "public.t11", {"id": 8}, None, {"id": 8}))
    assert [(table, keys) for _, table, keys, _ in backfills.recent] == [("public.t11", [(8,)])]
    assert list(backfills.queue) == [second]
