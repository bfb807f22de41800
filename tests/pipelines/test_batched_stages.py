"""Stages on a batch of changes at a time: the compiled ``--where`` (`RowWhere.each`), the
format's `EncodeLines`, and `_Segment` running them, give exactly what one call per change
gives; a failure names the change that failed; ``--processes`` writes the same bytes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal

import pytest
from value_families import every_value_family

from changefeed import _speedups
from changefeed.backends.postgres.position import PgPosition
from changefeed.change import UNCHANGED, Change, Operation, Truncate
from changefeed.cli.pipeline_options import build_cli_pipeline
from changefeed.formats.codec import dumps_line
from changefeed.formats.registry import FORMATS, FormatOptions
from changefeed.pipelines._steps import _Entry, _Segment
from changefeed.pipelines.sinks import JsonLine
from changefeed.pipelines.stages import EncodeLines, where
from changefeed.pipelines.where_expressions import RowWhere, parse_where
from changefeed.testing import MemoryFeed


class Strict:
    """A value whose comparisons with numbers raise ValueError (not TypeError): the filter must
    fail."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int):
            raise ValueError("no comparing")
        return NotImplemented

    __lt__ = __le__ = __gt__ = __ge__ = __eq__  # type: ignore[assignment]
    __hash__ = None  # type: ignore[assignment]


class Row(Mapping):
    """A row that is a Mapping but not a dict."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def __getitem__(self, key):
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


ROWS = [
    {"id": 1, "status": "open", "n": 3, "owner": {"name": "ann", "team": {"id": 2}}},
    {"id": 2, "status": "done", "n": Decimal("2.5"), "owner": {"name": "bob"}},
    {"id": 3, "status": None, "n": "three", "owner": "nobody"},
    {"id": 4, "n": -1, "owner": Row({"name": "ann"})},
    {"id": 5, "status": UNCHANGED, "n": 2**70, "owner": None},
    {},
    {**every_value_family(), "id": 6},
]
WHERES = [
    'status == "open"', "status != null", "n >= 2", "n < 2.5", "n == 3 or n == -1",
    'owner.name == "ann"', "owner.team.id == 2", 'not (owner.name == "ann") and id > 1',
    "missing == 1", "not missing == 1", "id >= 0", "numeric > 1", "date >= 'x'",
    'text == "tâche é\U0001f600"',
]


def changes_of(rows: list) -> list:
    made: list = []
    for number, row in enumerate(rows):
        position = PgPosition(100, number)
        made.append(Change(Operation.INSERT, "public.t", row, None, ("id",), position))
        made.append(Change(Operation.UPDATE, "public.t", row, {"id": 0}, ("id",), position))
        made.append(Change(Operation.DELETE, "public.t", None, row, ("id",), position))
    made.append(Change(Operation.DELETE, "public.t", None, None, ("id",), PgPosition(101)))
    made.append(Truncate("public.t", PgPosition(102)))
    return made


@pytest.mark.parametrize("text", WHERES)
def test_where_on_a_batch_decides_as_one_call_per_change(text):
    stage = RowWhere(parse_where(text))
    changes = changes_of(ROWS)
    assert stage.each(changes) == [stage(change) for change in changes]
    kept = [change for change in stage.each(changes) if change is not None]
    assert all(got is sent for got, sent in zip(kept, [c for c in changes if stage(c)],
                                                  strict=True))


def test_where_on_a_batch_raises_where_the_predicate_raises():
    stage = RowWhere(parse_where("n == 1"))
    changes = changes_of([{"n": 1}, {"n": Strict()}])
    with pytest.raises(ValueError, match="no comparing"):
        stage.each(changes)
    with pytest.raises(AttributeError):  # not a change: as the predicate fails on it
        stage.each([{"n": 1}])


@pytest.mark.skipif(_speedups.kernels is None, reason="the compiled extension is not built")
def test_the_compiled_where_is_used():
    assert RowWhere(["==", "a", 1])._batch is not None


def segment_run(stages, changes, dead_letter=None):
    entries = [_Entry(change, keep_change=True) for change in changes]
    return _Segment(stages, keep_change=True, dead_letter=dead_letter).process(entries)


@pytest.mark.parametrize("batched", [True, False])
def test_a_failure_in_a_batch_names_the_first_change_that_failed(batched):
    changes = changes_of([{"n": 1}, {"n": 2}, {"n": Strict()}, {"n": Strict()}])
    stage = RowWhere(parse_where("n == 1"))
    if not batched:
        stage = where(stage.predicate)  # no `each`: one call per change
    entries, failure = segment_run([stage], changes)
    assert failure is not None and "position '0000000000000064:00000002'" in failure.message
    assert "no comparing" in failure.message
    assert [entry.position for entry in entries] == [change.position for change in changes[:6]]
    assert [len(entry.items) for entry in entries] == [1, 1, 1, 0, 0, 0]


def test_a_later_stage_failing_on_an_earlier_change_wins():
    """Each stage takes the whole batch in turn: the failure reported is the one a change met
    first, in feed order, as if the changes went one at a time."""
    changes = changes_of([{"n": 1}, {"n": 2}, {"n": 3}])

    def late(change):
        if change.new and change.new["n"] == 3:
            raise RuntimeError("first stage")
        return change

    def early(change):
        if change.new and change.new["n"] == 2:
            raise RuntimeError("second stage")
        return change

    entries, failure = segment_run([late, early], changes)
    assert failure is not None and "second stage" in failure.message
    assert len(entries) == 3


def test_with_dead_letters_only_the_failed_changes_are_dead():
    changes = changes_of([{"n": 1}, {"n": Strict()}, {"n": 1}])
    entries, failure = segment_run([RowWhere(parse_where("n == 1"))], changes,
                                   dead_letter=print)
    assert failure is None and len(entries) == len(changes)
    dead = [bool(entry.dead) for entry in entries]
    assert dead == [False] * 3 + [True] * 3 + [False] * 5  # the insert, update, delete of n
    assert all(entry.items == [] for entry, is_dead in zip(entries, dead, strict=True) if is_dead)


@pytest.mark.parametrize("known", FORMATS, ids=lambda known: known.name)
def test_encode_lines_writes_the_bytes_of_the_format_s_items(known):
    options = FormatOptions(model={"public.t": "T"}, url="postgresql://h/db")
    stage = EncodeLines(known.name, options)
    items = known.items(options)
    changes = changes_of([every_value_family(), {"id": 1}])
    lines = stage.each(changes)
    assert all(type(line) is JsonLine for line in lines)
    assert [without_clock(line.line) for line in lines] == [
        without_clock(dumps_line(items(change))) for change in changes]
    assert [without_clock(stage(change).line) for change in changes] == [
        without_clock(line.line) for line in lines]
    assert stage.name == EncodeLines(known.name, options).name  # named as the format's stage
    assert stage.each([{"not": "a change"}]) is None  # one at a time: the stage's own call


def without_clock(lines: bytes) -> bytes:
    """Debezium's ``ts_ms`` says when a line was written: the one part that differs."""
    return re.sub(rb'"ts_ms":\d+', b'"ts_ms":0', lines)


def run_cli_pipeline(tmp_path, name, processes, workers=1, **options):
    out = tmp_path / f"{name}.jsonl"
    feed = MemoryFeed("public.t", changes=[
        Change(Operation.INSERT, "public.t", {**every_value_family(), "id": n}, None, ("id",))
        for n in range(5)
    ] + [Change(Operation.UPDATE, "public.t", {"id": n, "x": "y"}, {"id": n}, ("id",))
         for n in range(5, 2500)] + [Truncate("public.t")])
    pipeline = build_cli_pipeline(feed, sink=str(out), processes=processes, workers=workers,
                                  **options)
    assert pipeline.run() == 2501
    return without_clock(out.read_bytes())


@pytest.mark.parametrize("options", [
    {"fmt": "delta"}, {"fmt": "change"}, {"fmt": "debezium"},
    {"fmt": "delta", "where": "id >= 3 and id != 7", "model": "Task"},
    {"fmt": "debezium", "where": "id < 100", "filter": '[">=", "id", 2]'},
], ids=str)
def test_processes_write_the_bytes_of_the_in_process_run(tmp_path, options):
    """With ``--processes``, and with 3 copies of each stage's process (``--workers``)."""
    in_process = run_cli_pipeline(tmp_path, "in", False, **options)
    assert in_process.count(b"\n") > 90
    assert run_cli_pipeline(tmp_path, "processes", True, **options) == in_process
    assert run_cli_pipeline(tmp_path, "copies", False, workers=3, **options) == in_process


def test_a_python_stage_is_called_once_per_change_even_when_one_fails():
    """Only the built-in pure stages take batches: a Python stage or predicate is never run
    twice on a change (a failure is found by its own call)."""
    seen: list = []

    def keep_small(change):
        seen.append(change.position)
        if change.new and change.new["n"] == 3:
            raise RuntimeError("too big")
        return True

    changes = changes_of([{"n": 1}, {"n": 2}, {"n": 3}])
    entries, failure = segment_run([where(keep_small)], changes)
    assert failure is not None and "too big" in failure.message
    assert seen == [change.position for change in changes[:7]]  # up to the failing insert
    assert len(entries) == 6
