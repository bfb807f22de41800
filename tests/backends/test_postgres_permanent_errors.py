"""Errors the server repeats on every retry end a feed with one line instead of reconnecting
forever; errors a new connection may not meet again are retried.

Classified by SQLSTATE (`errors.sqlstate_is_transient`), also where psycopg raises nothing itself
(a refused START_REPLICATION, a stream the server ended with an error), and for a login the
server refuses for good when a feed reconnects (a role that may no longer log in, CONNECT
revoked, a database closed to connections). Each member is produced on a real server.
"""

from __future__ import annotations

import select
import time

import psycopg
import pytest
from psycopg import pq

from changefeed.backends.postgres import errors
from changefeed.backends.postgres.names import publication_names_literal
from changefeed.errors import PermanentBackendError, TransientBackendError

# -- by SQLSTATE, pure ------------------------------------------------------------------------


@pytest.mark.parametrize("code, transient", [
    ("08006", True), ("08003", True),  # connection failures
    ("40001", True), ("40P01", True),  # serialization failure, deadlock
    ("53100", True), ("53200", True), ("53300", True),  # disk full, out of memory, connections
    ("57P01", True), ("57P02", True), ("57P03", True), ("57014", True),  # shutdown, cancel
    ("58000", True), ("58030", True),  # system and I/O errors
    ("55006", True), ("55P03", True),  # object in use, lock not available
    ("53400", False),  # configuration limit exceeded (max_replication_slots)
    ("57P04", False),  # database dropped
    ("58P01", False),  # undefined file (WAL removed)
    ("42601", False), ("42602", False), ("42704", False), ("42P01", False),  # syntax, names
    ("42501", False),  # insufficient privilege
    ("22023", False), ("22003", False),  # invalid parameter value, out of range
    ("28000", False), ("28P01", False),  # authorization
    ("0A000", False), ("54000", False), ("55000", False), ("XX000", False), ("F0000", False),
    ("3D000", False), ("2F003", False), ("39P01", False), ("P0001", False), ("25006", False),
])
def test_sqlstate_classes(code, transient):
    assert errors.sqlstate_is_transient(code) is transient
    assert errors.is_transient(errors.server_error(code, "x")) is transient


def test_a_code_psycopg_has_no_class_for_keeps_its_class():
    error = errors.server_error("42ZZZ", "made up")
    assert error.sqlstate == "42ZZZ" and isinstance(error, psycopg.ProgrammingError)
    assert not errors.is_transient(error)
    assert errors.is_transient(errors.server_error(None, "lost"))


@pytest.mark.parametrize("text, permanent", [
    ('FATAL:  password authentication failed for user "app"', True),
    ('FATAL:  role "app" does not exist', True),
    ('FATAL:  database "app" does not exist', True),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "app", database "app"', True),
    ('FATAL:  role "app" is not permitted to log in', True),
    ('FATAL:  permission denied for database "app"', True),
    ('FATAL:  database "app" is not currently accepting connections', True),
    ("server does not support SSL, but SSL was required", True),
    ("FATAL:  the database system is starting up", False),
    ("FATAL:  the database system is shutting down", False),
    ("FATAL:  sorry, too many clients already", False),
    ("Connection refused\n\tIs the server running on that host?", False),
    ("timeout expired", False),
])
def test_a_login_refused_for_good_is_permanent(text, permanent):
    exc = psycopg.OperationalError(
        f'connection to server at "db" (10.0.0.1), port 5432 failed: {text}')
    error = errors.connection_error(exc, "host=db")
    assert isinstance(error, PermanentBackendError if permanent else TransientBackendError)
    assert error.message.startswith("cannot connect to PostgreSQL at db:5432: ")


# -- what a real server answers --------------------------------------------------------------


@pytest.fixture
def probe_slot(pg):
    pg.execute("SELECT pg_create_logical_replication_slot('probe', 'pgoutput')")
    yield "probe"


def start(dsn: str, slot: str, options: str) -> tuple[Exception | None, psycopg.Connection]:
    """START_REPLICATION with ``options`` as the feed sends it; the error the feed makes of a
    refusal (None if the server accepted), and the connection."""
    repl = psycopg.connect(dsn, autocommit=True, replication="database")
    repl.pgconn.send_query(
        f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({options})".encode())
    result = repl.pgconn.get_result()
    if result.status == pq.ExecStatus.COPY_BOTH:
        return None, repl
    code = result.error_field(pq.DiagnosticField.SQLSTATE).decode()
    return errors.start_replication_error(slot, code, result.error_message.decode()), repl


@pytest.mark.postgres
@pytest.mark.parametrize("options, code, message", [
    # what the feed sent before names were quoted: a publication name with a double quote
    ("proto_version '1', publication_names '\"'", "42602", "invalid publication_names syntax"),
    ("proto_version '99', publication_names 'p'", "0A000", "client sent proto_version=99"),
    ("proto_version '1', publication_names 'p', messages 'maybe'", "42601",
     "messages requires a Boolean value"),
    ("proto_version '1', publication_names 'p', nonsense 'x'", "XX000",
     "unrecognized pgoutput option"),
    ("proto_version '1', publication_names E'p'", "42601", "syntax error"),
])
def test_a_start_replication_the_server_refuses_for_good_is_permanent(
        pg_dsn, probe_slot, options, code, message):
    error, repl = start(pg_dsn, probe_slot, options)
    repl.close()
    assert error is not None and error.sqlstate == code
    assert not errors.is_transient(error)
    assert str(error).startswith(message) and "\n" not in str(error)


@pytest.mark.postgres
def test_hostile_publication_names_reach_pgoutput_as_they_are(pg_dsn, pg, probe_slot):
    names = ['p"; drop table t; --', "Upper,Comma", "back\\slash 'q'", " space ", "ünï",
             "1leading", 'a""b,"c"', "é" * 31]
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    for name in names:
        pg.execute(psycopg.sql.SQL("CREATE PUBLICATION {} FOR TABLE t").format(
            psycopg.sql.Identifier(name)))
    options = f"proto_version '1', publication_names {publication_names_literal(names)}"
    error, repl = start(pg_dsn, probe_slot, options)
    try:
        assert error is None
        pg.execute("INSERT INTO t VALUES (1)")
        deadline = time.monotonic() + 30
        while True:  # the first change decodes: every publication was found
            nbytes, data = repl.pgconn.get_copy_data(1)
            if nbytes > 0 and data[0:1] == b"w":
                break
            if nbytes < 0:
                result = repl.pgconn.get_result()
                pytest.fail(f"the stream ended: {result.error_message}")
            assert time.monotonic() < deadline, "no change within 30 s"
            select.select([repl.pgconn.socket], [], [], 0.5)
            repl.pgconn.consume_input()
    finally:
        repl.close()
    assert pg.execute("SELECT count(*) FROM t").fetchone() == (1,)  # nothing was injected


@pytest.mark.postgres
@pytest.mark.parametrize("event, code, transient", [
    ("SELECT pg_terminate_backend(pid) FROM pg_stat_replication", "57P01", True),
    ("DROP PUBLICATION p", "42704", True),  # the feed's setup then says what to do
])
def test_a_stream_the_server_ends_is_judged_by_its_sqlstate(
        pg_dsn, pg, probe_slot, event, code, transient):
    from changefeed.backends.postgres.ledger import AckLedger
    from changefeed.backends.postgres.stream import ReplicationStream

    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("CREATE PUBLICATION p FOR TABLE t")
    repl = psycopg.connect(pg_dsn, autocommit=True, replication="database")
    stream = ReplicationStream.start(repl, probe_slot, "p", messages=False, ledger=AckLedger(),
                                     status_interval=10)
    try:
        pg.execute(event)
        pg.execute("INSERT INTO t VALUES (1)")
        deadline = time.monotonic() + 30
        for frame in stream.frames:
            assert time.monotonic() < deadline, "the stream did not end within 30 s"
            if frame is None:
                stream.wait(0.1)
        error = stream.ended()
    finally:
        repl.close()
    assert errors.is_transient(error) is transient
    assert "\n" not in str(error)
    if not isinstance(error, TransientBackendError):
        assert error.sqlstate == code
