"""Record pgoutput messages from a real PostgreSQL into tests/backends/recorded/pgoutput.json.

Run it again (``.venv/bin/python tests/backends/record_pgoutput.py``) when the workload below
changes; test_pgoutput.py decodes the recording without a server. The file keeps each
XLogData payload as hex, in order, with the server version that produced it.
"""

from __future__ import annotations

import json
import select
import time
from pathlib import Path

import psycopg

from changefeed.embedded import TemporaryPostgres

OUT = Path(__file__).parent / "recorded" / "pgoutput.json"

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE everything (
    id serial PRIMARY KEY, i int, b bigint, n numeric, t text, flag boolean, at timestamptz,
    d date, u uuid, j jsonb, arr int[], bin bytea, m mood, big text
);
CREATE TABLE keyed (a int, b text, note text, PRIMARY KEY (a, b));
ALTER TABLE keyed REPLICA IDENTITY FULL;
CREATE PUBLICATION rec FOR TABLE everything, keyed;
"""

WORKLOAD = [
    # one transaction, two rows: they share a commit LSN
    """BEGIN;
    INSERT INTO everything (i, b, n, t, flag, at, d, u, j, arr, bin, m, big) VALUES
      (42, 9007199254740993, 12345.678900, 'hé "quoted"', true, '2024-02-29 12:34:56.789+00',
       '2024-02-29', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1, 2, {"x": null}]}',
       '{1,NULL,3}', '\\x00ff10', 'happy',
       (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g));
    INSERT INTO everything (i) VALUES (NULL);
    COMMIT;""",
    "UPDATE everything SET i = 43 WHERE id = 1",  # big is TOASTed and unchanged: not sent
    "UPDATE everything SET id = 10 WHERE id = 2",  # key change: old key sent ('K')
    "DELETE FROM everything WHERE id = 10",
    "INSERT INTO keyed VALUES (1, 'x', 'first')",
    "UPDATE keyed SET note = 'second' WHERE a = 1",  # REPLICA IDENTITY FULL: old row ('O')
    "DELETE FROM keyed WHERE a = 1",
    "TRUNCATE keyed",
]


def record() -> None:
    with TemporaryPostgres() as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SETUP)
            version = conn.info.server_version
        repl = psycopg.connect(dsn, autocommit=True, replication="database")
        repl.execute("CREATE_REPLICATION_SLOT rec LOGICAL pgoutput NOEXPORT_SNAPSHOT")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in WORKLOAD:
                conn.execute(statement)
        pgconn = repl.pgconn
        pgconn.send_query(
            b"START_REPLICATION SLOT rec LOGICAL 0/0 (proto_version '1', publication_names 'rec')"
        )
        pgconn.get_result()
        messages = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            nbytes, buffer = pgconn.get_copy_data(1)
            if nbytes == 0:
                select.select([pgconn.socket], [], [], 0.2)
                pgconn.consume_input()
                continue
            if buffer[0] == ord("w"):
                messages.append(bytes(buffer[25:]).hex())
                deadline = time.monotonic() + 1
        repl.close()
    OUT.write_text(
        json.dumps({"server_version": version, "workload": WORKLOAD, "messages": messages},
                   indent=1) + "\n"
    )
    print(f"recorded {len(messages)} messages from PostgreSQL {version} into {OUT}")


if __name__ == "__main__":
    record()
