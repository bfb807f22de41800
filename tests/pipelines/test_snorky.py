"""The Snorky sink against a real Snorky DataSync server, watched by WebSocket subscribers.

The server is snorky 0.1.0a4 (in its own virtualenv, ``.venv-snorky``, made by ``make install``:
it pins tornado 4.5.3) run by ``snorky_server.py``, which works around its known problems on
current Python. See the ``snorky`` fixture in conftest.py.
"""

from __future__ import annotations

import pytest
from testservers import SNORKY_KEY as KEY
from testservers import received, subscribe

from changefeed import PipelineError
from changefeed.pipelines import Pipeline, subscription, to_delta
from changefeed.pipelines.sinks.http import SnorkySink
from changefeed.testing import MemoryFeed, delete, insert, update

CHANGES = [
    insert("public.tasks", {"id": 1, "color": "blue", "title": "a"}, key={"id": 1}),
    insert("public.tasks", {"id": 2, "color": "red", "title": "b"}, key={"id": 2}),
    update("public.tasks", {"id": 2, "color": "blue", "title": "b"},  # enters "blue"
           {"id": 2, "color": "red", "title": "b"}, key={"id": 2}),
    update("public.tasks", {"id": 1, "color": "blue", "title": "A"},  # stays blue
           {"id": 1, "color": "blue", "title": "a"}, key={"id": 1}),
    update("public.tasks", {"id": 1, "color": "green", "title": "A"},  # leaves "blue"
           {"id": 1, "color": "blue", "title": "A"}, key={"id": 1}),
    delete("public.tasks", {"id": 2, "color": "blue", "title": "b"}, key={"id": 2}),
]


def test_snorky_subscribers_receive_the_deltas_the_sink_publishes(snorky):
    with subscribe(snorky, "AllTasks", None) as everything, \
            subscribe(snorky, "FilteredTasks", ["==", "color", "blue"]) as blue:
        feed = MemoryFeed("public.tasks", changes=CHANGES)
        sink = SnorkySink(f"{snorky}/backend", service="datasync_backend", key=KEY)
        Pipeline(feed, [to_delta(model="Task")], sink=sink).run()
        assert feed.checkpoint.positions == {"public.tasks": 6}

        everything_got = received(everything, 6)
        assert everything_got == [to_delta("Task")(change) for change in CHANGES]
        assert everything_got[3] == {"type": "update", "model": "Task",
                                     "newData": {"id": 1, "color": "blue", "title": "A"},
                                     "oldData": {"id": 1, "color": "blue", "title": "a"}}
        assert everything_got[5] == {"type": "delete", "model": "Task",
                                     "data": {"id": 2, "color": "blue", "title": "b"}}

        # Snorky's filter dealer and our subscription stage agree on what "blue" sees.
        ours = [to_delta("Task")(c) for c in map(subscription(["==", "color", "blue"]), CHANGES)
                if c is not None]
        theirs = received(blue, len(ours))
        assert theirs == ours
        assert [d["type"] for d in theirs] == ["insert", "insert", "update", "delete", "delete"]


def test_snorky_errors_are_pipeline_errors(snorky):
    feed = MemoryFeed("tasks", changes=[insert("tasks", {"id": 1})])
    bad_delta = [lambda change: {"type": "upsert", "model": "Task", "data": change.new}]
    with pytest.raises(PipelineError, match="Snorky refused the deltas: Invalid delta type"):
        Pipeline(feed, bad_delta, sink=SnorkySink(f"{snorky}/backend", key=KEY)).run()
    with pytest.raises(PipelineError, match="answered 401"):
        Pipeline(feed, [to_delta()], sink=SnorkySink(f"{snorky}/backend", key="wrong")).run()
    assert feed.checkpoint.positions == {}


def test_an_unknown_snorky_service_times_out_with_a_hint(snorky):
    feed = MemoryFeed("tasks", changes=[insert("tasks", {"id": 1})])
    sink = SnorkySink(f"{snorky}/backend", service="no_such_service", key=KEY, timeout=0.5)
    with pytest.raises(PipelineError, match="is the service name 'no_such_service' right"):
        Pipeline(feed, [to_delta()], sink=sink).run()
