"""The RethinkDB backend's pure parts: decoding changefeed documents, positions, and the
bookkeeping that decides whether a stream reads the table first (snapshot, re-sync).

The decoder runs on changefeed documents in the shapes of RethinkDB's changes() reference
(recorded/rethinkdb_events.json), read with the driver's own JSON decoder.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from rethinkdb.ast import ReQLDecoder

from changefeed import Change, Operation
from changefeed.backends.rethinkdb import State, decode_change, make_position
from changefeed.backends.rethinkdb.events import READY, StreamHistory, StreamPlan
from changefeed.errors import DecodeError, PermanentBackendError, TransientBackendError

RAW = json.loads((Path(__file__).parent / "recorded" / "rethinkdb_events.json").read_text())


def driver_json(doc: Any) -> Any:
    """``doc`` as the driver hands it out: through its JSON decoder (TIME, BINARY converted)."""
    return ReQLDecoder({}).decode(json.dumps(doc))


FEED = [driver_json(doc) for doc in RAW["feed"]]
TABLE = "app.tasks"
INSERT, UPDATE, DELETE = Operation.INSERT, Operation.UPDATE, Operation.DELETE


def decoded(docs: Iterable[Any] = FEED) -> list[Change | State | None]:
    return [decode_change(doc, TABLE, "id") for doc in docs]


# -- the decoder --------------------------------------------------------------------------------


def test_the_initial_read_is_framed_by_states_and_gives_snapshot_inserts():
    events = decoded()
    assert events[0] == State("initializing") and events[3] == State("ready")
    first, second = events[1:3]
    assert first.operation == INSERT and first.snapshot is True
    assert first.table == TABLE and first.old is None
    assert first.key == {"id": "8a4e3d0c-5b1f-4c2e-9d7a-1f2e3d4c5b6a"}
    assert first.new["owner"] == {"name": "Ada", "team": "core"}
    assert first.new["tags"] == ["docs", "urgent"]
    assert second.new["due"] is None and second.snapshot is True


def test_add_is_an_insert_with_the_drivers_values():
    add = decoded()[4]
    assert add.operation == INSERT and add.snapshot is False and add.old is None
    assert add.key == {"id": "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"}
    due = add.new["due"]
    assert isinstance(due, datetime)
    assert due == datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=timezone.utc)
    assert due.utcoffset() == timedelta(hours=1)  # the document's own offset is kept
    assert add.new["attachment"] == b"\x00\xff\x10"
    assert add.new["points"] == 1.5


def test_change_is_an_update_with_the_complete_old_row():
    change = decoded()[5]
    assert change.operation == UPDATE
    assert change.old == FEED[5]["old_val"] and change.new == FEED[5]["new_val"]
    assert change.old["done"] is False and change.new["done"] is True
    assert set(change.old) == set(change.new)  # the whole row, not just the key
    assert change.key == {"id": "8a4e3d0c-5b1f-4c2e-9d7a-1f2e3d4c5b6a"}


def test_remove_is_a_delete_with_the_complete_old_row():
    remove = decoded()[6]
    assert remove.operation == DELETE and remove.new is None
    assert remove.old == FEED[6]["old_val"] and remove.old["title"] == "ship it"
    assert remove.key == {"id": "c9b8a7f6-e5d4-4c3b-8a29-1807f6e5d4c3"}


def test_rethinkdb_has_no_commit_timestamps_or_transactions():
    changes = [e for e in decoded() if isinstance(e, Change)]
    assert len(changes) == 5
    assert all(c.committed_at is None and c.transaction is None for c in changes)


def test_position_and_snapshot_meta_are_passed_through():
    initial = decode_change(FEED[1], TABLE, position="p", snapshot_meta={"resync": 2})
    assert initial.position == "p" and initial.meta == {"resync": 2}
    add = decode_change(FEED[4], TABLE, position="q", snapshot_meta={"resync": 2})
    assert add.position == "q" and add.meta is None  # only re-read rows carry it


def test_another_primary_key_names_the_key():
    doc = {"type": "add", "old_val": None, "new_val": {"sku": "A-1", "qty": 2}}
    assert decode_change(doc, "shop.stock", "sku").key == {"sku": "A-1"}


def test_an_error_document_raises_a_transient_error():
    with pytest.raises(TransientBackendError, match="skipped 12 elements") as info:
        decode_change(RAW["error"], TABLE)
    assert TABLE in str(info.value)


def test_uninitial_of_a_limit_feed_is_skipped():
    uninitial, add = decoded(driver_json(doc) for doc in RAW["limit_feed"]["docs"])
    assert uninitial is None
    assert add.operation == INSERT


def test_documents_without_types_are_understood():
    ops = [c.operation for c in decoded(RAW["without_types"]["docs"])]
    assert ops == [INSERT, UPDATE, DELETE]
    assert decode_change({"state": "ready"}, TABLE) == State("ready")


def test_an_unknown_type_is_an_error_not_a_silent_skip():
    with pytest.raises(PermanentBackendError, match="'merge'"):
        decode_change({"type": "merge", "new_val": {"id": 1}}, TABLE)


def test_positions_sort_as_strings_like_numbers():
    positions = [make_position(1_700_000_000_000, 9), make_position(1_700_000_000_000, 10),
                 make_position(1_700_000_000_001, 1)]
    assert positions == sorted(positions)
    assert json.loads(json.dumps(positions)) == positions


def test_changes_pickle_for_pipelines():
    change = decoded()[4]
    assert pickle.loads(pickle.dumps(change)) == change


def test_an_unknown_type_is_a_decode_error():
    with pytest.raises(DecodeError):
        decode_change({"type": "merge", "new_val": {"id": 1}}, TABLE)
    assert decode_change({"state": "ready"}, TABLE) == READY


# -- what a stream reads first ----------------------------------------------------------------


def test_a_plain_feed_streams_changes_only_and_a_reconnect_re_reads():
    history = StreamHistory(snapshot=False, resync=True, restarted=False)
    first = history.next_stream()
    assert first == StreamPlan(include_initial=False) and first.snapshot_meta is None
    history.stream_opened(1_000)
    second = history.next_stream()
    assert second == StreamPlan(include_initial=True, resync=1)
    assert second.snapshot_meta == {"resync": 1}


def test_a_plan_changes_nothing_until_the_stream_is_open():
    history = StreamHistory(snapshot=False, resync=True, restarted=False)
    history.next_stream()  # the connection failed: nothing was streamed
    assert history.next_stream() == StreamPlan(include_initial=False)


def test_re_reads_are_numbered_when_they_complete():
    history = StreamHistory(snapshot=False, resync=True, restarted=True)
    plan = history.next_stream()
    assert plan == StreamPlan(include_initial=True, resync=1)
    history.stream_opened(1_000)
    # Interrupted before "ready": the next re-read has the same number.
    assert history.next_stream().resync == 1
    history.stream_opened(2_000)
    history.initial_read_done(plan)
    assert history.resyncs == 1 and history.next_stream().resync == 2


def test_a_snapshot_is_read_until_one_read_completes_even_without_resync():
    history = StreamHistory(snapshot=True, resync=False, restarted=False)
    plan = history.next_stream()
    assert plan == StreamPlan(include_initial=True) and plan.snapshot_meta is None
    history.stream_opened(1_000)
    again = history.next_stream()  # the read was interrupted
    assert again == StreamPlan(include_initial=True, changes_lost=True)
    history.stream_opened(2_000)
    history.initial_read_done(again)
    assert history.resyncs == 0  # a snapshot is no re-read
    assert history.next_stream() == StreamPlan(include_initial=False, changes_lost=True)


def test_without_resync_a_restart_loses_what_happened_meanwhile():
    history = StreamHistory(snapshot=False, resync=False, restarted=True)
    assert history.next_stream() == StreamPlan(include_initial=False, changes_lost=True)


def test_runs_increase_even_when_the_clock_does_not():
    history = StreamHistory(snapshot=False, resync=True, restarted=False)
    runs = [history.stream_opened(now) for now in (5_000, 5_000, 4_000, 9_000)]
    assert runs == [5_000, 5_001, 5_002, 9_000]
    positions = [make_position(run, 1) for run in runs]
    assert positions == sorted(positions)

