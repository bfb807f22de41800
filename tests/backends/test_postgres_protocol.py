"""The pure parts of the PostgreSQL backend, without a server: the replication framing, the
acknowledgement ledger and the classification of errors."""

from __future__ import annotations

import struct
from datetime import datetime, timezone

import psycopg
import pytest
from psycopg import errors as sqlstate

from changefeed import MemoryCheckpoint
from changefeed.backends.postgres import PostgresChangeFeed, errors, protocol
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.position import PgPosition
from changefeed.errors import (
    ConfigurationError,
    PermanentBackendError,
    ResumeError,
    TransientBackendError,
)

# -- framing -----------------------------------------------------------------------------------


def test_xlogdata_header_and_payload_offset():
    message = b"w" + struct.pack("!QQq", 0x16B374D848, 0x16B374D900, 123) + b"B..."
    assert protocol.xlogdata_header(message) == (0x16B374D848, 0x16B374D900, 123)
    assert message[protocol.XLOGDATA_HEADER_SIZE:] == b"B..."
    assert message[0] == protocol.XLOGDATA


def test_keepalive_with_and_without_a_reply_requested():
    assert protocol.keepalive(b"k" + struct.pack("!QqB", 0x100, 7, 1)) == (0x100, 7, True)
    assert protocol.keepalive(memoryview(b"k" + struct.pack("!QqB", 0x100, 7, 0))) == (
        0x100, 7, False)
    assert b"k"[0] == protocol.KEEPALIVE


def test_standby_status_update_bytes():
    # 2000-01-01 00:00:01 UTC is one second after PostgreSQL's epoch.
    message = protocol.standby_status(0x20, 0x10, unix_time=946_684_801.0, reply=True)
    assert message == b"r" + struct.pack("!QQQqB", 0x20, 0x10, 0x10, 1_000_000, 1)
    assert len(protocol.standby_status(1, 0, unix_time=0.0)) == 34


def test_lsn_text_and_protocol_timestamps():
    assert protocol.format_lsn(0x16B374D848) == "16/B374D848"
    assert protocol.parse_lsn("16/B374D848") == 0x16B374D848
    assert protocol.format_lsn(protocol.parse_lsn("0/0")) == "0/0"
    assert protocol.pg_timestamp(1_500_000) == datetime(2000, 1, 1, 0, 0, 1, 500_000,
                                                         tzinfo=timezone.utc)


# -- the ledger --------------------------------------------------------------------------------


def test_a_transaction_is_flushed_once_its_last_change_is_acknowledged():
    ledger = AckLedger()
    ledger.begin()
    ledger.commit("00000000000000A0:00000002", 0xB0)
    assert ledger.flush_lsn == 0 and ledger.undelivered()
    ledger.acknowledge("00000000000000A0:00000001")  # inside the transaction: not yet
    assert ledger.flush_lsn == 0
    ledger.acknowledge("00000000000000A0:00000002")
    assert ledger.flush_lsn == 0xB0 and not ledger.undelivered()
    assert ledger.flush_due and ledger.status() == (0xB0, 0xB0)
    ledger.reported(0xB0)
    assert not ledger.flush_due


def test_transactions_read_ahead_move_the_flush_lsn_one_by_one():
    ledger = AckLedger()
    for lsn, end in ((0xA0, 0xA8), (0xC0, 0xC8), (0xE0, 0xE8)):
        ledger.begin()
        ledger.commit(f"{lsn:016X}:00000000", end)
    ledger.acknowledge(f"{0xC0:016X}:00000000")
    assert ledger.flush_lsn == 0xC8 and ledger.undelivered()
    ledger.acknowledge(f"{0xE0:016X}:00000000")
    assert ledger.flush_lsn == 0xE8


def test_an_empty_or_wholly_filtered_transaction_is_passed_at_once():
    ledger = AckLedger()
    ledger.begin()
    ledger.commit(None, 0x50)
    assert ledger.flush_lsn == 0x50


def test_an_empty_transaction_waits_behind_an_unacknowledged_one():
    ledger = AckLedger()
    ledger.commit(f"{0xA0:016X}:00000000", 0xA8)
    ledger.commit(None, 0xB8)
    assert ledger.flush_lsn == 0
    ledger.acknowledge(f"{0xA0:016X}:00000000")
    assert ledger.flush_lsn == 0xB8


def test_keepalives_advance_an_idle_slot_only_when_nothing_is_pending():
    ledger = AckLedger()
    ledger.keepalive(0x100)
    assert ledger.flush_lsn == 0x100 and ledger.received_lsn == 0x100
    ledger.begin()
    ledger.keepalive(0x200)  # inside a transaction
    assert ledger.flush_lsn == 0x100
    ledger.commit(f"{0x180:016X}:00000000", 0x190)
    ledger.keepalive(0x300)  # a transaction pending
    assert ledger.flush_lsn == 0x100
    assert ledger.undelivered() and ledger.undelivered(backlog=True)
    ledger.acknowledge(f"{0x180:016X}:00000000")
    ledger.keepalive(0x300)
    assert ledger.flush_lsn == 0x300
    assert ledger.undelivered(backlog=True) and not ledger.undelivered()


def test_a_hold_keeps_what_the_server_is_told_back_until_released():
    ledger = AckLedger()
    ledger.commit(f"{0xA0:016X}:00000000", 0xA8)
    ledger.acknowledge(f"{0xA0:016X}:00000000")
    ledger.begin()
    ledger.hold(ledger.flush_lsn)  # inside the next transaction: the slot stays before it
    ledger.commit(f"{0xC0:016X}:00000000", 0xC8)
    ledger.acknowledge(f"{0xC0:016X}:00000000")
    ledger.keepalive(0x200)
    assert ledger.flush_lsn == 0x200  # delivered: what the feed knows
    assert ledger.confirmable_lsn == 0xA8 and ledger.status() == (0x200, 0xA8)
    ledger.reported(0xA8)
    ledger.hold(0xB0)  # a later hold does not move the earlier one
    assert not ledger.flush_due and ledger.confirmable_lsn == 0xA8
    ledger.stream_closed()
    assert not ledger.acknowledged_after_close
    ledger.release()
    assert ledger.flush_due and ledger.status() == (0x200, 0x200)
    assert ledger.acknowledged_after_close


def test_a_message_outside_transactions_is_passed_once_acknowledged():
    ledger = AckLedger()
    position = f"{0x4F:016X}:00000000"
    ledger.standalone_message(position, 0x50)
    assert ledger.received_lsn == 0x50 and ledger.flush_lsn == 0
    ledger.acknowledge(position)
    assert ledger.flush_lsn == 0x50


def test_acknowledgements_after_the_stream_closed_and_a_new_stream():
    ledger = AckLedger("00000000000000A0:00000001")  # from the checkpoint
    assert ledger.replay_after == "00000000000000A0:00000001"
    ledger.commit("00000000000000C0:00000000", 0xC8)
    ledger.restart()  # the stream closed: what was read is read again by the next one
    ledger.acknowledge("00000000000000C0:00000000")
    assert ledger.flush_lsn == 0 and not ledger.undelivered()
    assert AckLedger({"not": "ours"}).replay_after is None


def test_the_dropped_tables_rule_and_the_snapshot_done_rule():
    ledger = AckLedger()
    ledger.received(0x80)
    assert not ledger.delivered_through(0x90) and ledger.delivered_through(0x80)
    ledger.snapshot_last = "0000000000000000:00000003"
    ledger.acknowledge("0000000000000000:00000002")
    assert not ledger.snapshot_delivered()
    ledger.acknowledge("0000000000000000:00000003")
    assert ledger.snapshot_delivered() and not ledger.snapshot_delivered()  # said once


@pytest.mark.parametrize("checkpoint", ["a0:1", "00000000000000A0:00000001"])
def test_the_ledger_reads_a_checkpoint_s_text_back_as_a_position(checkpoint):
    ledger = AckLedger(checkpoint)
    assert type(ledger.acknowledged) is PgPosition
    assert ledger.acknowledged == "00000000000000A0:00000001" == ledger.replay_after
    assert ledger.delivered(PgPosition(0xA0, 1)) and ledger.delivered(PgPosition(0x9F, 9))
    assert not ledger.delivered(PgPosition(0xA0, 2)) and not ledger.delivered(None)


@pytest.mark.parametrize("foreign", ["first", 7, {"not": "ours"}, None])
def test_an_acknowledgement_of_no_stream_position_changes_nothing(foreign):
    ledger = AckLedger()
    ledger.commit(PgPosition(0xA0, 0), 0xA8)
    ledger.acknowledge(foreign)  # a caller's prefeed item
    assert ledger.acknowledged is None and ledger.flush_lsn == 0
    ledger.acknowledge(PgPosition(0xA0, 0))
    ledger.acknowledge(foreign)
    assert ledger.acknowledged == PgPosition(0xA0, 0) and ledger.flush_lsn == 0xA8


def test_only_an_acknowledgement_after_the_stream_closed_needs_telling_the_slot():
    ledger = AckLedger()
    ledger.commit(PgPosition(0xA0, 0), 0xA8)
    ledger.commit(PgPosition(0xC0, 0), 0xC8)
    ledger.acknowledge(PgPosition(0xA0, 0))
    ledger.stream_closed()  # its last status said 0xA8, or could not
    assert not ledger.acknowledged_after_close
    ledger.acknowledge(PgPosition(0xC0, 0))  # after the close
    assert ledger.acknowledged_after_close
    ledger.reported(0xC8)
    assert not ledger.acknowledged_after_close


def test_the_feed_s_acknowledged_position_is_the_ledger_s():
    checkpoint = MemoryCheckpoint()
    checkpoint.save("tasks", "a0:1")  # as a hand-edited checkpoint may hold it
    feed = PostgresChangeFeed("tasks", connection="postgresql://nowhere/db", checkpoint=checkpoint)
    assert feed.acknowledged == "00000000000000A0:00000001"
    assert type(feed.acknowledged) is PgPosition  # read back as the stream's type
    feed.ack("00000000000000b0:0")
    assert feed.acknowledged == PgPosition(0xB0, 0) and type(feed.acknowledged) is PgPosition
    assert checkpoint.load("tasks") == "00000000000000b0:0"  # saved as acknowledged
    feed.ack("first")  # a caller's prefeed item: saved, but no stream position
    assert feed.acknowledged == PgPosition(0xB0, 0)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc,transient", [
    (TransientBackendError("x"), True),
    (sqlstate.AdminShutdown("x"), True),
    (sqlstate.CrashShutdown("x"), True),
    (sqlstate.CannotConnectNow("x"), True),
    (psycopg.OperationalError("connection lost"), True),
    (sqlstate.ObjectNotInPrerequisiteState("invalidated"), False),
    (sqlstate.InsufficientPrivilege("no"), False),
    (PermanentBackendError("x"), False),
    (ValueError("x"), False),
])
def test_what_is_transient(exc, transient):
    assert errors.is_transient(exc) is transient


def test_a_refused_connection_is_transient_with_its_last_reason():
    exc = psycopg.OperationalError(
        'connection to server at "db" (10.0.0.1), port 5433 failed: Connection refused\n'
        '\tIs the server running on that host?\n'
        'connection to server at "db" (10.0.0.2), port 5433 failed: timeout expired\n'
    )
    error = errors.connection_error(exc, "host=db port=5433")
    assert isinstance(error, TransientBackendError)
    assert error.message == "cannot connect to PostgreSQL at db:5433: timeout expired"
    bad = errors.connection_error(psycopg.ProgrammingError("invalid dsn"), "x")
    assert isinstance(bad, ConfigurationError) and bad.message == "bad PostgreSQL URL: invalid dsn"


def test_replication_refused_is_said_from_the_catalog():
    no_privilege = errors.replication_refused(False, "app", "app", 0, 10)
    assert isinstance(no_privilege, PermanentBackendError)
    assert "ALTER ROLE app REPLICATION" in no_privilege.message
    busy = errors.replication_refused(True, "app", "app", 10, 10)
    assert isinstance(busy, TransientBackendError) and "raise max_wal_senders" in busy.message
    assert errors.replication_refused(True, "app", "app", 1, 10) is None


def test_slot_errors_by_sqlstate():
    assert isinstance(errors.slot_in_use("s", 7, first_connection=True), PermanentBackendError)
    assert errors.slot_in_use("s", 7, first_connection=False).message == (
        "slot s is in use by another process (pid 7)")
    assert isinstance(errors.slot_creation_error("s", sqlstate.DuplicateObject("x")),
                      TransientBackendError)
    full = errors.slot_creation_error("s", sqlstate.ConfigurationLimitExceeded("all in use"))
    assert isinstance(full, PermanentBackendError) and "max_replication_slots" in full.message
    other = sqlstate.InsufficientPrivilege("x")
    assert errors.slot_creation_error("s", other) is other
    assert isinstance(errors.start_replication_error("s", "55006", "busy"), TransientBackendError)
    assert isinstance(errors.start_replication_error("s", "55000", "lost"), ResumeError)
    assert isinstance(errors.start_replication_error("s", "42704", "gone"), TransientBackendError)
    unknown = errors.start_replication_error("s", "", "")
    assert type(unknown) is psycopg.OperationalError and str(unknown) == "START_REPLICATION failed"
    ended = errors.stream_ended("")
    assert errors.is_transient(ended) and str(ended) == "the server ended the replication stream"
    assert errors.text(b" a\n") == "a" and errors.text(None) == ""
