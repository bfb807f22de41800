"""Resume tokens as positions, and where a stream starts: pure, no server."""

from __future__ import annotations

import json

import bson
import pytest
from bson import Binary

from changefeed import ConfigurationError
from changefeed.backends.mongodb.positions import (
    Start,
    position_token,
    resume_options,
    snapshot_position,
    token_position,
    where_to_start,
)

T1 = {"_data": "8265000001"}
T2 = {"_data": "8265000002"}


def test_legacy_binary_resume_tokens_round_trip_as_extended_json():
    token = {"_data": Binary(b"\x82\x01\x02"), "_typeBits": Binary(b"\x40")}
    position = token_position(token)
    assert json.loads(json.dumps(position)) == position
    assert bson.encode(position_token(position)) == bson.encode(token)  # the same BSON
    assert position_token({"_data": "8265", "snapshot": 3}) == {"_data": "8265"}
    with pytest.raises(ConfigurationError, match="not a MongoDB resume token"):
        position_token({"lsn": 12})



def test_snapshot_positions_count_from_the_streams_start_and_the_last_says_done():
    assert snapshot_position(T1, 1, False) == {"_data": T1["_data"], "snapshot": 1}
    assert snapshot_position(T1, 3, True) == {"_data": T1["_data"], "snapshot": 3, "done": True}
    assert snapshot_position({}, 2, False) == {"snapshot": 2}  # the server gave no token
    assert T1 == {"_data": "8265000001"}  # not modified


def test_resuming_uses_start_after_only_for_the_token_the_stream_started_after():
    assert resume_options(T2) == {"resume_after": T2}
    assert resume_options(T2, start_after=T1) == {"resume_after": T2}
    assert resume_options(T1, start_after=T1) == {"start_after": T1}


# -- where a stream starts -----------------------------------------------------------------------


def test_a_first_run_starts_from_now_with_the_snapshot_if_asked():
    assert where_to_start(None) == Start({}, snapshot=False)
    assert where_to_start(None, snapshot_prefeed=True) == Start({}, snapshot=True)
    assert where_to_start(None).description == "from now"


def test_an_acknowledged_token_is_resumed_after():
    start = where_to_start({"_data": T1["_data"]}, snapshot_prefeed=True)
    assert start == Start({"resume_after": T1}) and not start.snapshot
    assert start.description == "after the saved resume token"


def test_a_legacy_token_in_the_checkpoint_is_resumed_after_as_bson():
    token = {"_data": Binary(b"\x82\x01"), "_typeBits": Binary(b"\x40")}
    [(kind, resumed)] = where_to_start(token_position(token)).watch.items()
    assert kind == "resume_after" and bson.encode(resumed) == bson.encode(token)


def test_in_process_the_latest_token_is_used_while_every_yielded_change_was_acknowledged():
    latest = {"resume_after": T2}
    assert where_to_start(T1, latest=latest, yielded=T1) == Start({"resume_after": T2})
    assert where_to_start(None, latest=latest, yielded=None) == Start({"resume_after": T2})
    # A change was handed out but not acknowledged: go back to the acknowledged one.
    assert where_to_start(T1, latest=latest, yielded=T2) == Start({"resume_after": T1})


def test_after_an_invalidate_the_stream_starts_after_it():
    start = where_to_start(T1, latest={"start_after": T2}, yielded=T1)
    assert start.watch == {"start_after": T2}
    assert start.description == "after the end of its previous stream"


def test_a_completed_snapshot_is_not_read_again():
    done = snapshot_position(T1, 3, True)
    assert where_to_start(done, snapshot_prefeed=True) == Start({"resume_after": T1})
    # Completed, but the stream had no token: from now (the snapshot is not read again).
    assert where_to_start({"snapshot": 3, "done": True}) == Start({})


def test_an_unfinished_snapshot_is_read_again_when_asked_or_when_there_is_no_token():
    unfinished = snapshot_position(T1, 1, False)
    assert where_to_start(unfinished, snapshot_prefeed=True) == \
        Start({}, snapshot=True, snapshot_again=True)
    assert where_to_start({"snapshot": 1}) == Start({}, snapshot=True, snapshot_again=True)
    # Without the snapshot prefeed, an unfinished snapshot with a token resumes from the token.
    assert where_to_start(unfinished) == Start({"resume_after": T1})


def test_a_checkpoint_that_is_no_token_names_the_feed():
    with pytest.raises(ConfigurationError, match="checkpoint of app.tasks holds '0/16B3748'"):
        where_to_start("0/16B3748", feed_id="app.tasks")
    with pytest.raises(ConfigurationError, match="not a MongoDB resume token"):
        where_to_start({"_data": 42})
