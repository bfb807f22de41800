"""Pipelines on the real PostgreSQL feed (server started by tests/conftest.py)."""

from __future__ import annotations

import json
import uuid

import pytest
from feeds import FAST_RETRY

from changefeed import PipelineError, get_changefeed
from changefeed.pipelines import JsonLinesSink, Pipeline, subscription, to_delta
from changefeed.testing import ListSink

pytestmark = pytest.mark.postgres


def feed_of(dsn: str, slot: str, **options):
    return get_changefeed(dsn, "tasks", slot=slot, retry=FAST_RETRY, **options)


@pytest.fixture
def tasks(pg):
    pg.execute("CREATE TABLE tasks (id int PRIMARY KEY, color text, title text)")
    return pg


def test_snapshot_then_stream_through_a_filtered_subscription(pg_dsn, tasks):
    tasks.execute("ALTER TABLE tasks REPLICA IDENTITY FULL")
    tasks.execute("INSERT INTO tasks VALUES (1, 'blue', 'a'), (2, 'red', 'b')")
    slot = f"pipe_{uuid.uuid4().hex[:8]}"
    sink = ListSink()
    stages = [subscription(["==", "color", "blue"]), to_delta(model="Task")]

    feed = feed_of(pg_dsn, slot, prefeed="snapshot")
    Pipeline(feed, stages, sink=sink).run(idle_timeout=0.5, timeout=20)
    tasks.execute("UPDATE tasks SET color = 'blue' WHERE id = 2")   # enters
    tasks.execute("UPDATE tasks SET title = 'A' WHERE id = 1")      # stays
    tasks.execute("UPDATE tasks SET color = 'green' WHERE id = 1")  # leaves
    tasks.execute("DELETE FROM tasks WHERE id = 2")
    Pipeline(feed, stages, sink=sink).run(idle_timeout=1.0, timeout=20)

    assert sink.items == [
        {"type": "insert", "model": "Task", "data": {"id": 1, "color": "blue", "title": "a"}},
        {"type": "insert", "model": "Task", "data": {"id": 2, "color": "blue", "title": "b"}},
        {"type": "update", "model": "Task", "newData": {"id": 1, "color": "blue", "title": "A"},
         "oldData": {"id": 1, "color": "blue", "title": "a"}},
        {"type": "delete", "model": "Task", "data": {"id": 1, "color": "blue", "title": "A"}},
        {"type": "delete", "model": "Task", "data": {"id": 2, "color": "blue", "title": "b"}},
    ]
    assert feed.acknowledged == feed.stats.last_position  # every change handled


def test_a_filter_on_a_default_replica_identity_says_to_set_it_full(pg_dsn, tasks):
    feed = feed_of(pg_dsn, f"pipe_{uuid.uuid4().hex[:8]}")
    sink = ListSink()
    seen = []

    def note_position(change):
        seen.append(change.position)
        return change

    stages = [note_position, subscription(["==", "color", "blue"]), to_delta()]
    Pipeline(feed, stages, sink=sink).run(idle_timeout=0.3, timeout=20)  # creates the slot
    tasks.execute("INSERT INTO tasks VALUES (1, 'blue', 'a')")
    tasks.execute("UPDATE tasks SET color = 'red' WHERE id = 1")
    with pytest.raises(PipelineError, match="REPLICA IDENTITY FULL") as info:
        Pipeline(feed, stages, sink=sink).run(idle_timeout=1.0, timeout=20)
    assert "subscription" in str(info.value)
    assert [d["type"] for d in sink] == ["insert"]
    assert len(seen) == 2 and feed.acknowledged == seen[0]  # the insert's, not the update's


def test_multi_process_pipeline_resumes_from_the_slot_without_losing_rows(pg_dsn, tasks, tmp_path):
    slot = f"pipe_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out.jsonl"
    stages = [to_delta()]
    batching = {"batch_size": 25, "batch_seconds": 0.2}
    Pipeline(feed_of(pg_dsn, slot), stages, sink=JsonLinesSink(out), processes=True,
             **batching).run(idle_timeout=0.3, timeout=20)
    for i in range(1, 201):
        tasks.execute("INSERT INTO tasks VALUES (%s, 'blue', 'x')", [i])
    Pipeline(feed_of(pg_dsn, slot), stages, sink=JsonLinesSink(out), processes=True,
             **batching).run(limit=120, timeout=20)
    # A new feed (as after a crash: nothing in memory) resumes from the slot's confirmed position.
    Pipeline(feed_of(pg_dsn, slot), stages, sink=JsonLinesSink(out), processes=True,
             **batching).run(idle_timeout=1.0, timeout=20)
    delivered = [json.loads(line)["data"]["id"] for line in out.read_text().splitlines()]
    assert set(delivered) == set(range(1, 201))
    assert delivered[:120] == list(range(1, 121))
