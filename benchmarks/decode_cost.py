"""Where `changefeed run`'s CPU goes per change, measured without the server in the loop.

bench_postgres.py times whole runs, which on a shared machine vary by a third from round to
round. This script records the same workload's pgoutput stream once (the raw messages, from a
throwaway cluster), then replays it in this process, several rounds, through the stages of the
CLI's path, each round timed in CPU time:

    copy     slice each recorded message as the feed does (the reference: no decoding at all)
    decode   + PgOutputDecoder.decode(): Changes with Python values
    encode   + delta_line_encoder(): the JSON line ``changefeed run`` writes
    deliver  the same, through ``changefeed run``'s loop: `ChangeFeed.read()`,
             `changefeed.delivery.bounded` and `deliver` with a `LineOutput` to /dev/null
    direct   (compiled path only) pgoutput bytes straight to the delta line, no `Change`
             (`PgOutputDecoder.line_decoder`, one message at a time: a replay has no frame
             reader to batch from)
    direct-deliver  (compiled path only) the same through ``changefeed run``'s loop

(`run_instructions.py` counts a whole ``changefeed run``, where the direct path batches the
row changes at hand.)

``--shape narrow`` replays a table of an int key and a short text instead of the benchmark's
six columns. ``CHANGEFEED_IMPL=python`` measures the pure-Python path (`instructions.py` runs
every stage both ways under valgrind).

and prints microseconds per change and each stage's cost relative to the reference. For exact
instruction counts (stable however loaded the machine is), run it under valgrind twice and
subtract:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/decode_cost.py --changes 20000 --rounds 1 --only encode

    .venv/bin/python benchmarks/decode_cost.py [--changes 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import select
import time
from collections.abc import Callable

import psycopg
from bench_postgres import TABLE, make_workload
from psycopg import pq

from changefeed import _speedups
from changefeed._speedups import Lines
from changefeed.backends.postgres.loading import psycopg_loaders
from changefeed.backends.postgres.pgoutput import PgOutputDecoder
from changefeed.change import Change
from changefeed.delivery import LineOutput, deliver
from changefeed.embedded import TemporaryPostgres
from changefeed.feed import ChangeFeed
from changefeed.formats.delta import delta_line_encoder

ROW_CHANGES = frozenset(b"IUD")
NARROW_TABLE = "CREATE TABLE bench (id int PRIMARY KEY, title text NOT NULL)"


def make_narrow_workload(conn: psycopg.Connection, changes: int) -> None:
    """The benchmark's inserts, updates and deletes on an int key and a short text."""
    rows = changes // 2
    for start in range(0, rows, 1000):
        with conn.transaction():
            conn.execute("INSERT INTO bench SELECT g, 'task ' || g"
                         " FROM generate_series(%s::int, %s::int) g",
                         [start + 1, min(start + 1000, rows)])
    for start in range(0, rows // 2, 1000):
        with conn.transaction():
            conn.execute("UPDATE bench SET title = title || '!' WHERE id BETWEEN %s AND %s",
                         [start + 1, start + 1000])
    for start in range(rows // 2, rows, 1000):
        with conn.transaction():
            conn.execute("DELETE FROM bench WHERE id BETWEEN %s AND %s",
                         [start + 1, start + 1000])


def record(dsn: str, changes: int, shape: str = "bench") -> list[bytes]:
    """The XLogData messages of a ``changes``-change workload, as the feed receives them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(NARROW_TABLE if shape == "narrow" else TABLE)
        conn.execute("CREATE PUBLICATION bench FOR TABLE bench")
        conn.execute("SELECT pg_create_logical_replication_slot('record', 'pgoutput')")
        (make_narrow_workload if shape == "narrow" else make_workload)(conn, changes)
    messages: list[bytes] = []
    seen = 0
    repl = psycopg.connect(dsn, autocommit=True, replication="database")
    try:
        pgconn = repl.pgconn
        pgconn.send_query(
            b"START_REPLICATION SLOT record LOGICAL 0/0"
            b" (proto_version '1', publication_names 'bench')"
        )
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise SystemExit("START_REPLICATION failed")
        while seen < changes:
            nbytes, buffer = pgconn.get_copy_data(1)
            if nbytes > 0:
                if buffer[0] == 119:  # 'w' XLogData
                    message = bytes(buffer)
                    messages.append(message)
                    seen += message[25] in ROW_CHANGES
                continue
            select.select([pgconn.socket], [], [], 1.0)
            pgconn.consume_input()
    finally:
        repl.close()  # mid-stream: no COMMIT, just go
    return messages


def stages(dsn: str) -> dict[str, Callable[[list[bytes]], int]]:
    """Each stage: a function replaying the messages through it, returning the change count."""
    # The feed's replication session uses UTC (see the PostgreSQL backend): so do the loaders.
    context = psycopg.connect(dsn, autocommit=True)
    context.execute("SET TimeZone TO 'UTC'")

    def make_decoder() -> PgOutputDecoder:
        return PgOutputDecoder(
            loaders=psycopg_loaders(context), primary_keys={"public.bench": ["id"]}
        )

    def decoder() -> Callable[[bytes], object]:
        return make_decoder().decode

    def copy(messages: list[bytes]) -> int:
        count = 0
        for message in messages:
            if message[25:][0] in ROW_CHANGES:
                count += 1
        return count

    def decode(messages: list[bytes]) -> int:
        decode = decoder()
        count = 0
        for message in messages:
            if decode(message[25:]).__class__ is Change:
                count += 1
        return count

    def encode(messages: list[bytes]) -> int:
        decode = decoder()
        encode_line = delta_line_encoder()  # what `changefeed run` writes its deltas with
        count = 0
        for message in messages:
            change = decode(message[25:])
            if change.__class__ is Change:
                encode_line(change)
                count += 1
        return count

    def delivered(messages: list[bytes]) -> int:
        decode = decoder()

        class Replay(ChangeFeed):
            def run_changefeed(self):  # type: ignore[no-untyped-def]
                for message in messages:
                    change = decode(message[25:])
                    if change.__class__ is Change:
                        yield change

        feed = Replay("bench")
        with open(os.devnull, "wb") as out:
            output = LineOutput(out, delta_line_encoder())
            return deliver(feed, output, ack_interval=0.2).count

    def direct(messages: list[bytes]) -> int:
        encode = make_decoder().line_decoder("delta")  # the lines `encode` writes
        count = 0
        for message in messages:
            event = encode(message[25:])
            if event.__class__ is Lines:
                count += event.count
        return count

    def direct_delivered(messages: list[bytes]) -> int:
        encode = make_decoder().line_decoder("delta")

        class Replay(ChangeFeed):
            def run_changefeed(self):  # type: ignore[no-untyped-def]
                for message in messages:
                    event = encode(message[25:])
                    if event.__class__ is Lines:
                        yield event

        feed = Replay("bench")
        with open(os.devnull, "wb") as out:
            output = LineOutput(out, delta_line_encoder())
            return deliver(feed, output, ack_interval=0.2).count

    runs = {"copy": copy, "decode": decode, "encode": encode, "deliver": delivered}
    if _speedups.kernels is not None:
        runs["direct"] = direct
        runs["direct-deliver"] = direct_delivered
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["copy", "decode", "encode", "deliver", "direct",
                                           "direct-deliver"],
                        default=None, help="run one stage (for instruction counts under valgrind)")
    parser.add_argument("--shape", choices=["bench", "narrow"], default="bench",
                        help="the benchmark's six columns, or an int key and a short text")
    args = parser.parse_args()
    with TemporaryPostgres() as server:
        messages = record(server.dsn(), args.changes, args.shape)
        runs = stages(server.dsn())
        if args.only:
            runs = {args.only: runs[args.only]}
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.process_time()
                count = run(messages)
                seconds = time.process_time() - started
                if count != args.changes:
                    raise SystemExit(f"{name}: replayed {count} changes, not {args.changes}")
                best[name] = min(best.get(name, seconds), seconds)
    reference = best.get("copy")
    print(f"{args.changes:,} changes ({args.shape} rows, {_speedups.implementation} path),"
          f" CPU per change, best of {args.rounds} rounds:")
    for name, seconds in best.items():
        ratio = f"  ({seconds / reference:.1f}x copy)" if reference else ""
        print(f"  {name:7} {seconds / args.changes * 1e6:6.2f} us{ratio}")


if __name__ == "__main__":
    main()
