"""A pipeline that only filters and formats for a file (``--where`` at most, ``--sink FILE``)
takes the feed's own lines (`ChangeFeed.prefer_lines`: pgoutput bytes to output bytes in C)
instead of `Change` objects, on a real server. Its file holds the bytes the pure-Python path
writes, in one process or with ``--processes`` (the lines cross as one buffer per batch); a
change the feed cannot judge or write itself (an unchanged TOASTed value) still goes through
the stages, a stage failing on one stops the run after what came before (exactly acknowledged),
and a sink failing mid-run loses nothing: what it did not write was not acknowledged and
comes again, in order.
"""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import uuid

import pytest
from clitools import CHANGEFEED, assert_exit

from changefeed import FileCheckpoint, PipelineError, _speedups, get_changefeed
from changefeed._speedups import Lines
from changefeed.cli.pipeline_options import build_cli_pipeline
from changefeed.formats.registry import FormatOptions
from changefeed.pipelines import JsonLinesSink, Pipeline, sinks
from changefeed.pipelines._crossing import _Chunk
from changefeed.pipelines._steps import _Entry
from changefeed.pipelines.stages import EncodeLines
from changefeed.pipelines.where_expressions import RowWhere, parse_where

pytestmark = pytest.mark.postgres

TABLE = """CREATE TABLE {name} (
    id int PRIMARY KEY, n numeric(12, 2), f float8, ok boolean, title text, raw bytea, u uuid,
    d date, at timestamptz, doc jsonb, tags int[], big text)"""
ROWS = 300


def make_changes(pg, name: str) -> None:
    """Inserts (NULLs, Unicode, TOASTed text), updates that leave the TOASTed column unchanged
    and updates that change it, deletes, and a truncate, in several transactions."""
    for start in range(1, ROWS + 1, 100):
        with pg.transaction():
            pg.execute(
                f"INSERT INTO {name} SELECT g, CASE WHEN g %% 7 = 0 THEN NULL ELSE g * 1.25 END,"
                " g / 3.0, g %% 2 = 0, 'tâche ' || g || ' é\U0001f600',"
                " decode(md5(g::text), 'hex'),"
                " md5(g::text)::uuid, date '2024-02-29' + g, timestamptz '2024-01-02 03:04:05+02'"
                " + g * interval '1 minute', jsonb_build_object('g', g, 'l', jsonb_build_array(g,"
                " null, 'x')), ARRAY[g, g + 1], CASE WHEN g %% 10 = 0 THEN (SELECT"
                " string_agg(md5((g * 1000 + k)::text), '') FROM generate_series(1, 200) k)"
                " END FROM generate_series(%s::int, %s::int) g", [start, start + 99])
    pg.execute(f"UPDATE {name} SET ok = NOT ok, title = title || '!' WHERE id <= 120")
    pg.execute(f"UPDATE {name} SET big = 'small now' WHERE id % 20 = 0")
    pg.execute(f"DELETE FROM {name} WHERE id > 250")
    pg.execute(f"TRUNCATE {name}")


@pytest.fixture
def stream(pg, pg_dsn):
    """A table, a publication and ``slots()`` made before its changes: ``(table, slots)``."""
    name = f"lines_{uuid.uuid4().hex[:8]}"
    pg.execute(TABLE.format(name=name))
    pg.execute(f"ALTER TABLE {name} REPLICA IDENTITY FULL")
    pg.execute(f"CREATE PUBLICATION {name} FOR TABLE {name}")
    slots = [f"{name}_{number}" for number in range(8)]
    for slot in slots:
        pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    make_changes(pg, name)
    return name, slots


def run(dsn: str, table: str, slot: str, out, *options: str, impl: str = "c",
        preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CHANGEFEED, "run", table, "--url", dsn, "--slot", slot, "--publication", table,
         "--sink", str(out), "--idle-timeout", "1", "--quiet", *options],
        capture_output=True, text=True, timeout=120, preexec_fn=preexec,
        env={**os.environ, "CHANGEFEED_IMPL": impl})


CASES = [
    ("--where", "n >= 10 and ok == true"),
    ("--where", 'title != "x"', "--format", "change"),
    ("--model", "Task"),
]


@pytest.mark.parametrize("options", CASES, ids=" ".join)
def test_the_feed_s_lines_give_the_bytes_of_the_python_path(pg_dsn, stream, tmp_path, options):
    table, slots = stream
    outputs = {}
    for slot, (name, extra, impl) in zip(slots, [
            ("python", (), "python"), ("c", (), "c"), ("c-processes", ("--processes",), "c"),
            ("python-processes", ("--processes",), "python")], strict=False):
        # With --processes, through a pipe (stdout) for a change.
        out = "/dev/stdout" if extra else tmp_path / f"{name}.jsonl"
        result = run(pg_dsn, table, slot, out, *options, *extra, impl=impl)
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout.encode() if extra else out.read_bytes()
        # Everything was acknowledged: the slot gives nothing more.
        again = run(pg_dsn, table, slot, out, *options, *extra, impl=impl)
        assert again.returncode == 0, again.stderr
        assert (again.stdout.encode() == b"") if extra else out.read_bytes() == outputs[name]
    assert outputs["python"].count(b"\n") > 100
    assert outputs["c"] == outputs["python"]
    assert outputs["c-processes"] == outputs["python-processes"] == outputs["python"]


@pytest.mark.skipif(_speedups.kernels is None, reason="the compiled extension is not built")
@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "processes"])
def test_the_sink_gets_the_feed_s_lines(pg_dsn, stream, tmp_path, monkeypatch, processes):
    """The lean path is taken: the sink writes `Lines` batches (and the few changes the feed
    handed out as they are, formatted by the stages), and confirms each change once; with
    ``processes`` in the sink's own process, the lines crossing to it."""
    table, slots = stream
    written = tmp_path / "classes"
    write_batch = sinks.JsonLinesSink.write_batch

    def noting(self, batch):  # runs in the sink's process: noted in a file
        with open(written, "a") as note:
            note.write("".join(f"{item.__class__.__name__}\n" for item in batch.items))
        write_batch(self, batch)

    monkeypatch.setattr(sinks.JsonLinesSink, "write_batch", noting)
    feed = get_changefeed(pg_dsn, table, slot=slots[0], publication=table)
    pipeline = build_cli_pipeline(feed, where="id >= 0", sink=str(tmp_path / "out.jsonl"),
                                  processes=processes)
    assert pipeline.multiprocess == processes
    handled = pipeline.run(idle_timeout=1.0, timeout=60)
    kinds = written.read_text().split()
    assert "Lines" in kinds and set(kinds) <= {"Lines", "JsonLine"}
    assert "JsonLine" in kinds  # the TOAST-unchanged updates and the truncate
    lines = (tmp_path / "out.jsonl").read_bytes().count(b"\n")
    assert handled == lines == ROWS + 120 + ROWS // 20 + 50 + 1
    assert feed.acknowledged == feed.stats.last_position


@pytest.mark.skipif(_speedups.kernels is None, reason="the compiled extension is not built")
@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "processes"])
def test_a_stage_failing_among_the_feed_s_lines_stops_after_what_came_before(
        pg_dsn, stream, tmp_path, processes):
    """Batches of the feed's lines pass a stage by (in its own process too, with
    ``processes``); the stage fails on the first change the feed handed out as it is (an update
    leaving a TOASTed value unchanged): what came before is written and acknowledged, exactly
    (the checkpoint keeps a position inside a transaction), and the next run starts with that
    change."""
    table, slots = stream
    reference = tmp_path / "reference.jsonl"
    result = run(pg_dsn, table, slots[0], reference, "--where", "id >= 0", impl="python")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out.jsonl"
    failing = {"on": True}

    def picky(change):
        if failing["on"]:
            raise RuntimeError("picky")
        return change

    def pipeline():
        feed = get_changefeed(pg_dsn, table, slot=slots[1], publication=table,
                              checkpoint=FileCheckpoint(tmp_path / "checkpoint"))
        assert feed.prefer_lines("delta", where=parse_where("id >= 0"))
        encode = EncodeLines("delta", FormatOptions())
        return feed, Pipeline(feed, [RowWhere(parse_where("id >= 0")), picky, encode],
                              sink=JsonLinesSink(str(out)), processes=processes)

    feed, first = pipeline()
    with pytest.raises(PipelineError, match="stage picky failed on the change at position"):
        first.run(idle_timeout=1.0, timeout=60)
    written = out.read_bytes()
    assert written.count(b"\n") >= 100  # the inserts, in batches of lines
    assert reference.read_bytes().startswith(written)
    assert first.handled == written.count(b"\n")
    failing["on"] = False
    feed, second = pipeline()
    second.run(idle_timeout=1.0, timeout=60)
    assert out.read_bytes() == reference.read_bytes()  # each change once, in order


def limited(size: int):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


@pytest.mark.parametrize("fmt", ["delta", "change"])
def test_a_sink_failing_mid_run_loses_nothing_and_resumes_in_order(pg_dsn, stream, tmp_path, fmt):
    table, slots = stream
    reference = tmp_path / "reference.jsonl"
    result = run(pg_dsn, table, slots[0], reference, "--where", "id > 5", "--format", fmt,
                 impl="python")
    assert result.returncode == 0, result.stderr
    expected = reference.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    result = run(pg_dsn, table, slots[1], out, "--where", "id > 5", "--format", fmt,
                 preexec=limited(40_000))
    assert_exit(result, 5, "File too large (EFBIG)")
    first = out.read_bytes().splitlines(keepends=True)
    assert 0 < len(first) < len(expected) and out.stat().st_size <= 40_000
    assert first == expected[:len(first)]  # whole lines, in order: a batch in full or not at all
    result = run(pg_dsn, table, slots[1], out, "--where", "id > 5", "--format", fmt)
    assert result.returncode == 0, result.stderr
    resumed = out.read_bytes().splitlines(keepends=True)[len(first):]
    # At least once: the second run starts at or before the first line not written, and goes
    # on in order to the end.
    start = len(expected) - len(resumed)
    assert 0 <= start <= len(first) and resumed == expected[start:]


@pytest.mark.skipif(_speedups.kernels is None, reason="the compiled extension is not built")
def test_the_feed_s_lines_cross_a_process_boundary_whole(pg_dsn, stream):
    """A `_Chunk` holding batches of the feed's lines (among changes) is unpickled into the
    same batches: bytes, lines, positions, counts, commit times."""
    table, slots = stream
    feed = get_changefeed(pg_dsn, table, slot=slots[0], publication=table)
    assert feed.prefer_lines("change", where=parse_where("id < 50 or ok == true"))
    taken = list(changes_of(feed, ROWS + 120 + ROWS // 20 + 50 + 1))
    assert any(item.__class__ is Lines for item in taken)
    assert any(item.__class__ is not Lines for item in taken)
    for keep in (False, True):
        chunk = _Chunk([_Entry(item, keep) for item in taken], flush=True)
        for entry, item in zip(pickle.loads(pickle.dumps(chunk)).entries, taken, strict=True):
            got = entry.items[0]
            assert got.__class__ is item.__class__ and entry.position == item.position
            if item.__class__ is Lines:
                assert bytes(got) == bytes(item) and got.lines() == item.lines()
                assert got.count == item.count and got.positions() == item.positions()
                assert got.committed_at == item.committed_at and got.seen == item.seen
                assert bytes(got.head(1)) == bytes(item.head(1))
            else:
                assert got == item
    with pytest.raises(ValueError):
        _speedups.kernels.unpack_lines(b"x\n", b"\0" * 15, 1, True, 0, None)


def changes_of(feed, count: int):
    """The first ``count`` changes ``feed`` hands out (batches of lines counting as theirs)."""
    taken = 0
    for item in feed.changes(idle_timeout=2.0):
        if item is None:
            continue
        yield item
        taken += item.count if item.__class__ is Lines else 1
        if taken >= count:
            break
    feed.close()


class FillingSink(JsonLinesSink):
    """A file sink whose disk is full after ``room`` bytes: a batch that does not fit fails
    whole, as `append_whole` leaves it (`SinkUnavailable`)."""

    def __init__(self, path: str, room: int) -> None:
        super().__init__(path)
        self.room = room

    def write_batch(self, batch) -> None:
        size = sum(len(bytes(item)) if item.__class__ is Lines else len(item.line)
                   for item in batch.items)
        if size > self.room:
            raise sinks.SinkUnavailable("the disk is full")
        self.room -= size
        super().write_batch(batch)


@pytest.mark.skipif(_speedups.kernels is None, reason="the compiled extension is not built")
def test_a_sink_failing_in_its_own_process_loses_nothing_and_resumes_exactly(
        pg_dsn, stream, tmp_path):
    """The feed's lines cross to the sink's process; the sink fails on a batch mid-run: the
    batches before it are written and acknowledged exactly (a checkpoint), and the next run
    starts with the first change not written."""
    table, slots = stream
    reference = tmp_path / "reference.jsonl"
    result = run(pg_dsn, table, slots[0], reference, "--where", "ok == false", impl="python")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out.jsonl"

    def pipeline(sink):
        feed = get_changefeed(pg_dsn, table, slot=slots[1], publication=table,
                              checkpoint=FileCheckpoint(tmp_path / "checkpoint"))
        assert feed.prefer_lines("delta", where=parse_where("ok == false"))
        return Pipeline(feed, [RowWhere(parse_where("ok == false")),
                               EncodeLines("delta", FormatOptions())],
                        sink=sink, processes=True)

    with pytest.raises(PipelineError, match="the disk is full"):
        pipeline(FillingSink(str(out), 30_000)).run(idle_timeout=1.0, timeout=60)
    written = out.read_bytes()
    assert 0 < len(written) <= 30_000 and reference.read_bytes().startswith(written)
    pipeline(JsonLinesSink(str(out))).run(idle_timeout=1.0, timeout=60)
    assert out.read_bytes() == reference.read_bytes()  # each change once, in order
