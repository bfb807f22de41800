"""`ReplicationStream` without a server: the frames it hands out, the backlog read ahead, the
answers to keepalives, and the end of the stream.

libpq's side of a copy-both connection is played by `ScriptedConnection`: ``get_copy_data``
returns the scripted messages in order, and what the stream sends is recorded. The walsender's
real behaviour is covered by the live tests (test_postgres.py: slow consumers, shutdowns)."""

from __future__ import annotations

import gc
import socket
import struct
import time
from collections import deque
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from psycopg import pq

from changefeed.backends.postgres import stream as stream_module
from changefeed.backends.postgres.ledger import AckLedger
from changefeed.backends.postgres.pacing import ReadPacing, waiting_bytes
from changefeed.backends.postgres.pgoutput import Begin, Commit
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.protocol import PG_EPOCH_OFFSET_US
from changefeed.backends.postgres.stream import ReplicationStream
from changefeed.change import Change, Operation

NOTHING = (0, None)
END = (-2, None)


def xlogdata(payload: bytes, start: int = 0x100, wal_end: int = 0x900,
             sent_at: int = 0) -> tuple[int, memoryview]:
    message = b"w" + struct.pack("!QQq", start, wal_end, sent_at) + payload
    return len(message), memoryview(message)


def keepalive(wal_end: int, reply: bool) -> tuple[int, memoryview]:
    message = b"k" + struct.pack("!QqB", wal_end, 0, reply)
    return len(message), memoryview(message)


class ScriptedConnection:
    """The pgconn of a replication connection in copy-both mode, scripted."""

    def __init__(self, *script: tuple[int, memoryview | None]) -> None:
        self.script = deque(script)
        self.sent: list[tuple[int, int, bool]] = []  # standby statuses: written, flushed, reply
        self.copy_ended = False
        self._quiet, self._other = socket.socketpair()  # never readable: nothing more comes
        self.socket = self._quiet.fileno()
        self.transaction_status = pq.TransactionStatus.ACTIVE

    def get_copy_data(self, async_: int) -> tuple[int, memoryview | None]:
        return self.script.popleft() if self.script else NOTHING

    def put_copy_data(self, data: bytes) -> int:
        if self.copy_ended:
            raise AssertionError("CopyData after CopyDone")
        kind, written, flushed, _, _, reply = struct.unpack("!cQQQqB", data)
        assert kind == b"r"
        self.sent.append((written, flushed, bool(reply)))
        return 1

    def put_copy_end(self) -> int:
        self.copy_ended = True
        return 1

    def flush(self) -> int:
        return 0

    def consume_input(self) -> None:
        pass

    def is_busy(self) -> bool:
        return False

    def get_result(self) -> None:
        return None

    def get_error_message(self) -> bytes:
        return b"terminating walsender process"


class ScriptedReplication:
    closed = False

    def __init__(self, pgconn: ScriptedConnection) -> None:
        self.pgconn = pgconn

    def close(self) -> None:
        self.closed = True


def stream_of(*script, ledger: AckLedger | None = None) -> ReplicationStream:
    repl = ScriptedReplication(ScriptedConnection(*script))
    return ReplicationStream(repl, ledger or AckLedger(), 10.0, SimpleNamespace(lag_bytes=None))  # type: ignore[arg-type]


def take(stream: ReplicationStream, count: int) -> list[bytes | None]:
    frames = stream.frames
    return [None if (f := next(frames)) is None else bytes(f) for _ in range(count)]


def test_frames_are_the_payloads_in_order_then_none_when_nothing_is_at_hand():
    stream = stream_of(xlogdata(b"B1"), keepalive(0x200, False), xlogdata(b"C1"))
    assert take(stream, 3) == [b"B1", b"C1", None]
    assert stream.caught_up
    # The keepalive between them, read in stream order: nothing pending, so the slot may move
    # to the server's WAL end; no reply was asked for, none sent.
    assert stream.wal_end == 0x200 and stream.ledger.flush_lsn == 0x200
    assert stream.stats.lag_bytes == 0x200 and stream.pgconn.sent == []


def test_a_stream_left_in_a_cycle_mid_message_is_collected_cleanly():
    """The stream and its frame reader refer to each other: the collector frees them together
    while the reader still holds the last message (it once crashed the interpreter there)."""
    for _ in range(3):
        stream = stream_of(xlogdata(b"I1"), xlogdata(b"I2"))
        assert take(stream, 1) == [b"I1"]
        del stream
        gc.collect()
    stream = stream_of(xlogdata(b"I3"))
    assert take(stream, 2) == [b"I3", None]


def test_the_backlog_comes_first_and_its_bytes_are_counted_back_to_zero():
    first, second = xlogdata(b"I1"), xlogdata(b"I2", start=0x180)
    stream = stream_of(first, keepalive(0x300, False), second, xlogdata(b"I3"))
    assert take(stream, 1) == [b"I1"]
    stream.read_ahead()  # the consumer is busy: the rest is read into the backlog
    assert stream.backlog_bytes == second[0] + xlogdata(b"I3")[0] and not stream.caught_up
    assert stream.ledger.received_lsn == 0x180  # XLogData read ahead counts as received
    stream.pgconn.script.append(xlogdata(b"I4"))
    assert take(stream, 4) == [b"I2", b"I3", b"I4", None]
    assert stream.backlog_bytes == 0 and stream.caught_up


def test_reading_on_to_the_commit_takes_the_backlog_and_counts_it_back():
    position = PgPosition(0x100, 0)
    events = {b"C": Commit(0x100, 0x108, None), b"I": Change(Operation.INSERT, "t", {})}
    stream = stream_of(xlogdata(b"C"))
    stream.ledger.begin()
    stream.read_ahead()
    assert stream.read_to_commit(lambda payload: events[bytes(payload)], position) == 0x108
    assert stream.backlog_bytes == 0 and not stream.ledger.in_transaction
    assert stream.stats.lag_bytes == 0x900 - 0x108  # the server's WAL end at the Commit
    stream.ledger.acknowledge(position)
    assert stream.ledger.flush_lsn == 0x108


@pytest.mark.parametrize("next_event, expected", [("change", None), ("nothing", None)])
def test_reading_on_to_the_commit_gives_up_at_another_change_or_in_time(next_event, expected):
    events = {b"I": Change(Operation.INSERT, "t", {}), b"B": Begin(0x200, None, 1)}
    script = [xlogdata(b"B"), xlogdata(b"I")] if next_event == "change" else []
    stream = stream_of(*script)
    stream.COMMIT_WAIT_SECONDS = 0.05
    stream.ledger.begin()
    decode = lambda payload: events[bytes(payload)]  # noqa: E731
    assert stream.read_to_commit(decode, PgPosition(0x100, 0)) is expected
    assert stream.ledger.in_transaction  # nothing was recorded as ended


def test_a_keepalive_in_stream_order_moves_an_idle_slot_and_is_answered():
    stream = stream_of(keepalive(0x500, True))
    assert take(stream, 1) == [None]
    assert stream.ledger.flush_lsn == 0x500 and stream.pgconn.sent == [(0x500, 0x500, False)]
    assert stream.stats.lag_bytes == 0x500


def test_a_keepalive_read_ahead_behind_undelivered_stream_leaves_the_flush_unset():
    ledger = AckLedger()
    ledger.keepalive(0x80)  # confirmed up to here before
    stream = stream_of(xlogdata(b"I1", start=0x100), keepalive(0x500, True), ledger=ledger)
    stream.read_ahead()
    # Received up to the server's end, delivered: nothing said (0), so the slot stays.
    assert stream.pgconn.sent == [(0x500, 0, False)] and ledger.flush_lsn == 0x80
    assert take(stream, 2) == [b"I1", None]  # the keepalive's turn: no reply asked twice
    assert ledger.flush_lsn == 0x500  # in stream order, with nothing pending


def test_a_keepalive_read_ahead_with_everything_delivered_moves_the_slot():
    stream = stream_of(keepalive(0x500, True))
    stream.read_ahead()
    assert stream.pgconn.sent == [(0x500, 0x500, False)]


def test_the_end_of_the_stream_ends_the_frames_with_the_server_s_reason():
    stream = stream_of(xlogdata(b"B1"), END)
    assert take(stream, 1) == [b"B1"]
    assert list(stream.frames) == []
    assert "terminating walsender process" in str(stream.ended())


def test_finish_sends_the_last_status_and_answers_nothing_after_copydone():
    ledger = AckLedger()
    ledger.commit(PgPosition(0x100, 0), 0x108)
    ledger.acknowledge(PgPosition(0x100, 0))
    stream = stream_of(xlogdata(b"I9"), keepalive(0x900, True), END, ledger=ledger)
    stream.finish()
    assert stream.pgconn.sent == [(0x108, 0x108, False)] and stream.pgconn.copy_ended
    assert ledger.reported_lsn == 0x108 and not stream.usable
    assert list(stream.frames) == []  # it read on to the end


# -- pacing the reads of a backlog (ReadPacing) ----------------------------------------------

BUSY = ReadPacing.BUSY_WAKEUPS
BEHIND = ReadPacing.BEHIND_SECONDS


def test_a_live_stream_is_never_paused_however_busy():
    pacing = ReadPacing()
    for behind in (0.0, 0.001, BEHIND / 2, BEHIND - 0.001, -5.0):  # -5: a server clock ahead
        assert [pacing.pause(100, behind) for _ in range(5 * BUSY)] == [0.0] * (5 * BUSY)


def test_a_backlog_read_as_it_trickles_in_is_paused_after_a_streak_of_busy_wake_ups():
    for behind in (BEHIND, 3.0, 3600.0):
        pacing = ReadPacing()
        pauses = [pacing.pause(900, behind) for _ in range(2 * BUSY)]
        assert pauses == [0.0] * (BUSY - 1) + [ReadPacing.PAUSE] * (BUSY + 1)


def test_a_wake_up_with_nothing_waiting_or_caught_up_ends_the_streak():
    for breaker in ((0, 10.0), (900, 0.0)):  # nothing waiting; a live transaction read
        pacing = ReadPacing()
        assert [pacing.pause(900, 10.0) for _ in range(BUSY)][-1] == ReadPacing.PAUSE
        assert pacing.pause(*breaker) == 0.0
        assert [pacing.pause(900, 10.0) for _ in range(BUSY - 1)] == [0.0] * (BUSY - 1)
        assert pacing.pause(900, 10.0) == ReadPacing.PAUSE


def test_enough_bytes_waiting_are_read_at_once_so_a_fast_backlog_is_not_held_back():
    pacing = ReadPacing()
    for _ in range(BUSY):
        pacing.pause(900, 10.0)
    for waiting in (ReadPacing.ENOUGH_BYTES, 10 * ReadPacing.ENOUGH_BYTES, 1 << 24):
        assert pacing.pause(waiting, 10.0) == 0.0
    assert pacing.pause(ReadPacing.ENOUGH_BYTES - 1, 10.0) == ReadPacing.PAUSE


def test_a_live_transaction_read_ends_the_streak_without_asking_the_socket():
    for behind in (0.0, BEHIND - 0.001, -5.0):
        pacing = ReadPacing()
        assert [pacing.pause(900, 10.0) for _ in range(BUSY)][-1] == ReadPacing.PAUSE
        assert not pacing.reading_backlog(behind)
        assert [pacing.pause(900, 10.0) for _ in range(BUSY - 1)] == [0.0] * (BUSY - 1)
    assert all(ReadPacing().reading_backlog(behind) for behind in (BEHIND, 3.0, 3600.0))


COMMITTED = datetime(2026, 12, 3, 9, 30, 0, 250_000, tzinfo=timezone.utc)


def sent(after: float, committed: datetime = COMMITTED) -> int:
    """The walsender's send time (its clock, its epoch) ``after`` seconds after ``committed``."""
    return round((committed.timestamp() + after) * 1e6) - PG_EPOCH_OFFSET_US


def socket_asks(monkeypatch) -> list[int]:
    """The sockets the stream asks how many bytes wait (`waiting_bytes`), recorded."""
    asked: list[int] = []
    monkeypatch.setattr(stream_module, "waiting_bytes", lambda fd: asked.append(fd) or 0)
    return asked


@pytest.mark.parametrize("commit_sent_after, asks", [
    (None, False), (0.0, False), (BEHIND / 2, False), (BEHIND + 1, True), (3600.0, True),
])
def test_waiting_asks_how_much_the_socket_holds_only_while_reading_a_backlog(
        monkeypatch, commit_sent_after, asks):
    """A live stream's wake-up is one poll and one read: the pacing's ioctl only for a
    backlog (thousands of wake-ups a second otherwise pay a system call each for nothing)."""
    asked = socket_asks(monkeypatch)
    if commit_sent_after is None:  # no transaction read yet
        stream = stream_of()
    else:
        stream = stream_of(xlogdata(b"B", sent_at=sent(commit_sent_after)),
                           xlogdata(b"C", sent_at=sent(commit_sent_after)))
        take(stream, 1)
        stream.note_begin(COMMITTED)
        take(stream, 1)
        stream.note_commit(COMMITTED)
    for _ in range(3):
        assert stream.wait(0.0) is False  # nothing came
    assert asked == ([stream.pgconn.socket] * 3 if asks else [])
    stream.pgconn._other.send(b"x")  # the server sent something: the wait ends at once
    started = time.monotonic()
    assert stream.wait(10.0) is True and time.monotonic() - started < 5.0


@pytest.mark.parametrize("sent_after", [0.0, 0.002, BEHIND - 0.01, BEHIND, 7.5, 86400.0])
def test_a_transaction_is_judged_by_how_long_after_its_commit_the_server_sent_it(
        monkeypatch, sent_after):
    """Whether a backlog is read: the walsender's send time of the transaction's frames
    against its commit time, both by the server's clock. Not how long ago by ours: a live
    stream whose consumer took its time, or idled for minutes, is still live (its reader would
    otherwise ask the socket on every wake-up)."""
    asked = socket_asks(monkeypatch)
    stream = stream_of(xlogdata(b"B", sent_at=sent(sent_after)),
                       xlogdata(b"C", sent_at=sent(sent_after)))
    stream.note_commit(COMMITTED)  # before any frame: nothing known yet
    assert stream.sent_behind is None
    assert take(stream, 1) == [b"B"]
    stream.note_begin(COMMITTED)
    assert stream.sent_behind == pytest.approx(sent_after, abs=1e-6)
    assert take(stream, 1) == [b"C"]
    stream.note_commit(COMMITTED)
    assert stream.sent_behind == pytest.approx(sent_after, abs=1e-6)
    stream.wait(0.0)
    assert asked == ([stream.pgconn.socket] if sent_after >= BEHIND else [])


@pytest.mark.parametrize("backlog_sent_after", [BEHIND, 60.0, 86400.0])
def test_a_live_transaction_after_a_backlog_is_judged_from_its_begin(
        monkeypatch, backlog_sent_after):
    """The walsender flushes each message, so a live transaction's Commit may arrive a moment
    after the change before it was handed out. The wait for it is the live transaction's, not
    the backlog's read before (which asked the socket there: the CI failure of stop 25)."""
    asked = socket_asks(monkeypatch)
    live = datetime(2026, 12, 3, 9, 31, 0, tzinfo=timezone.utc)
    stream = stream_of(xlogdata(b"B-old", sent_at=sent(backlog_sent_after)),
                       xlogdata(b"C-old", sent_at=sent(backlog_sent_after)),
                       xlogdata(b"B-live", sent_at=sent(0.0004, live)),
                       xlogdata(b"I-live", sent_at=sent(0.0005, live)))
    take(stream, 1)
    stream.note_begin(COMMITTED)
    take(stream, 1)
    stream.note_commit(COMMITTED)
    stream.wait(0.0)  # between the two: the backlog's Commit decides
    assert asked == [stream.pgconn.socket]
    asked.clear()
    assert take(stream, 1) == [b"B-live"]
    stream.note_begin(live)
    assert take(stream, 2) == [b"I-live", None]  # the Commit has not come yet
    stream.wait(0.0)
    assert asked == []
    assert stream.sent_behind == pytest.approx(0.0005, abs=1e-6)


def test_a_transaction_sent_long_after_its_begin_becomes_a_backlog(monkeypatch):
    """One transaction too large to send at once (the walsender sends it only once it is
    committed) falls behind its commit as it is read: paced like any backlog from then on."""
    asked = socket_asks(monkeypatch)
    stream = stream_of(xlogdata(b"B", sent_at=sent(0.001)), xlogdata(b"I1", sent_at=sent(0.2)),
                       xlogdata(b"I2", sent_at=sent(BEHIND + 2)))
    take(stream, 1)
    stream.note_begin(COMMITTED)
    assert take(stream, 1) == [b"I1"]
    stream.wait(0.0)
    assert asked == []
    assert take(stream, 1) == [b"I2"]
    stream.wait(0.0)
    assert asked == [stream.pgconn.socket]


def test_messages_outside_transactions_are_judged_by_the_last_commit(monkeypatch):
    """A logical decoding message outside any transaction has no commit time: it is sent
    whenever it is emitted, maybe hours after the last Commit, and is no backlog for that."""
    asked = socket_asks(monkeypatch)
    stream = stream_of(xlogdata(b"B", sent_at=sent(0.001)), xlogdata(b"C", sent_at=sent(0.001)),
                       xlogdata(b"M", sent_at=sent(7200.0)))
    take(stream, 1)
    stream.note_begin(COMMITTED)
    take(stream, 1)
    stream.note_commit(COMMITTED)
    assert take(stream, 2) == [b"M", None]
    stream.wait(0.0)
    assert asked == [] and stream.sent_behind == pytest.approx(0.001, abs=1e-6)


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET])
def test_waiting_bytes_counts_what_the_socket_received_and_nobody_read(family):
    if family == socket.AF_UNIX:
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        listener = socket.create_server(("127.0.0.1", 0))
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
        listener.close()
    with left, right:
        assert waiting_bytes(right.fileno()) == 0
        for total in (1, 1000, 70000):
            left.sendall(b"x" * (total - waiting_bytes(right.fileno())))
            deadline = time.monotonic() + 5
            while waiting_bytes(right.fileno()) < total and time.monotonic() < deadline:
                time.sleep(0.001)  # loopback delivery is asynchronous for TCP
            assert waiting_bytes(right.fileno()) == total
        right.recv(500)
        assert waiting_bytes(right.fileno()) == 70000 - 500
    assert waiting_bytes(right.fileno()) == 0  # a closed socket: the platform cannot say
