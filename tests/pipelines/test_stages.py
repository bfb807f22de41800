"""Stages and Snorky filters, called directly: change in, items out."""

from __future__ import annotations

import pickle

import pytest

from changefeed import UNCHANGED, ConfigurationError, Operation, PipelineError
from changefeed.pipelines import (
    Pipeline,
    batch,
    compile_filter,
    project,
    route,
    subscription,
    to_delta,
    where,
)
from changefeed.pipelines.stages import apply_stage
from changefeed.testing import ListSink, MemoryFeed, delete, insert, update

ROW = {"id": 1, "color": "blue", "age": 30, "player": {"color": "red", "level": 3}}


@pytest.mark.parametrize(
    "filter, expected",
    [
        (["==", "color", "blue"], True),
        (["==", "color", "red"], False),
        (["<", "age", 31], True),
        (["<", "age", 30], False),
        (["<=", "age", 30], True),
        (["<=", "age", 29], False),
        ([">", "age", 29], True),
        ([">", "age", 30], False),
        ([">=", "age", 30], True),
        ([">=", "age", 31], False),
        (["and", ["==", "color", "blue"], [">", "age", 18]], True),
        (["and", ["==", "color", "blue"], [">", "age", 40]], False),
        (["or", ["==", "color", "red"], [">", "age", 18]], True),
        (["or", ["==", "color", "red"], [">", "age", 40]], False),
        (["not", ["==", "color", "red"]], True),
        (["not", ["==", "color", "blue"]], False),
        (["==", "player.color", "red"], True),
        ([">=", "player.level", 4], False),
        (["==", "missing", None], False),  # a missing field never matches ...
        (["not", ["==", "missing", 1]], True),  # ... so its negation does
        (["==", "color.deeper", "blue"], False),  # a dotted name through a non-dict
        (["<", "color", 3], False),  # values that cannot be ordered do not match
    ],
)
def test_filter_operators(filter, expected):
    assert compile_filter(filter)(ROW) is expected


@pytest.mark.parametrize(
    "bad", [[], "color", ["~=", "color", "blue"], ["==", "color"], ["not"], ["and"], ["==", 1, 2]]
)
def test_a_malformed_filter_is_a_configuration_error(bad):
    with pytest.raises(ConfigurationError):
        compile_filter(bad)


def test_where_keeps_matching_changes_and_drops_others():
    stage = where(lambda change: change.row["color"] == "blue")
    kept = insert("t", {"color": "blue"})
    assert stage(kept) is kept
    assert stage(insert("t", {"color": "red"})) is None
    assert stage.name.startswith("where(")


def test_project_keeps_the_listed_fields_of_new_and_old():
    change = update("t", {"id": 1, "a": 2, "b": 3}, {"id": 1, "a": 1, "b": 3})
    projected = project(["id", "a"])(change)
    assert (projected.new, projected.old) == ({"id": 1, "a": 2}, {"id": 1, "a": 1})
    assert projected.operation is Operation.UPDATE


def test_to_delta_has_snorky_shapes():
    stage = to_delta(model="Task")
    assert stage(insert("public.tasks", {"id": 1})) == {
        "type": "insert", "model": "Task", "data": {"id": 1}
    }
    assert stage(update("public.tasks", {"id": 1, "x": 2}, {"id": 1, "x": 1})) == {
        "type": "update", "model": "Task",
        "newData": {"id": 1, "x": 2}, "oldData": {"id": 1, "x": 1},
    }
    assert stage(delete("public.tasks", {"id": 1})) == {
        "type": "delete", "model": "Task", "data": {"id": 1}
    }
    assert to_delta()(insert("public.tasks", {"id": 1}))["model"] == "tasks"


def test_route_by_qualified_then_bare_table_name():
    stage = route(
        {"public.users": [project(["id"]), to_delta("User")], "tasks": to_delta("Task")},
        default=lambda change: None,
    )
    assert stage(insert("public.users", {"id": 1, "pw": "x"})) == [
        {"type": "insert", "model": "User", "data": {"id": 1}}
    ]
    assert stage(insert("app.tasks", {"id": 2}))[0]["model"] == "Task"
    assert stage(insert("public.other", {"id": 3})) == []
    assert route({"tasks": to_delta()})(insert("public.other", {"id": 3})) == []


def test_apply_stage_flattens_iterables_but_not_mappings():
    assert apply_stage(lambda c: None, 1) == []
    assert apply_stage(lambda c: {"a": 1}, 1) == [{"a": 1}]
    assert apply_stage(lambda c: (x for x in (1, 2)), 0) == [1, 2]
    assert apply_stage(lambda c: "text", 0) == ["text"]


def test_batch_checks_its_arguments():
    pipeline = Pipeline(MemoryFeed(), sink=ListSink(), batch_size=10, batch_seconds=0.5)
    assert (pipeline.policy.size, pipeline.policy.seconds) == (10, 0.5)
    for bad in ({"batch_size": 0}, {"batch_size": 2.5}, {"batch_size": True},
                {"batch_seconds": 0}, {"batch_seconds": -1},
                {"batch_size": 10, "batch_seconds": 0}):
        with pytest.raises(ConfigurationError):
            Pipeline(MemoryFeed(), sink=ListSink(), **bad)
    with pytest.deprecated_call(), pytest.raises(ConfigurationError):
        batch(0)


# -- subscription: what one filtered subscriber sees --------------------------------------------

BLUE = subscription(["==", "color", "blue"])


def test_subscription_inserts_and_deletes_pass_when_their_row_matches():
    assert BLUE(insert("t", {"id": 1, "color": "blue"})).operation is Operation.INSERT
    assert BLUE(insert("t", {"id": 1, "color": "red"})) is None
    key = {"key": {"id": 1}}
    assert BLUE(delete("t", {"id": 1, "color": "blue"}, **key)).operation is Operation.DELETE
    assert BLUE(delete("t", {"id": 1, "color": "red"}, **key)) is None


def test_subscription_update_inside_the_filter_stays_an_update():
    change = update("t", {"id": 1, "color": "blue", "n": 2}, {"id": 1, "color": "blue", "n": 1},
                    key={"id": 1})
    assert BLUE(change) is change


def test_subscription_update_entering_the_filter_becomes_an_insert_of_the_new_row():
    entered = BLUE(update("t", {"id": 1, "color": "blue"}, {"id": 1, "color": "red"},
                          key={"id": 1}, position=7))
    assert (entered.operation, entered.new, entered.old) == (
        Operation.INSERT, {"id": 1, "color": "blue"}, None
    )
    assert entered.position == 7


def test_subscription_update_leaving_the_filter_becomes_a_delete_of_the_old_row():
    left = BLUE(update("t", {"id": 1, "color": "red"}, {"id": 1, "color": "blue"}, key={"id": 1}))
    assert (left.operation, left.new, left.old) == (
        Operation.DELETE, None, {"id": 1, "color": "blue"}
    )
    assert to_delta("T")(left) == {
        "type": "delete", "model": "T", "data": {"id": 1, "color": "blue"}
    }


def test_subscription_update_outside_the_filter_is_dropped():
    assert BLUE(update("t", {"id": 1, "color": "red"}, {"id": 1, "color": "green"},
                       key={"id": 1})) is None


def test_subscription_on_dotted_fields():
    stage = subscription(["and", ["==", "player.color", "blue"], [">=", "player.level", 2]])
    entered = stage(update("t", {"id": 1, "player": {"color": "blue", "level": 2}},
                           {"id": 1, "player": {"color": "blue", "level": 1}}, key={"id": 1}))
    assert entered.operation is Operation.INSERT


def test_subscription_takes_unchanged_values_from_the_old_row():
    # A TOASTed column that did not change: PostgreSQL did not resend it.
    change = update("t", {"id": 1, "color": UNCHANGED, "n": 2},
                    {"id": 1, "color": "blue", "n": 1}, key={"id": 1})
    assert BLUE(change) is change  # still blue on both sides: an update
    entered = subscription([">=", "n", 2])(change)
    assert entered.operation is Operation.INSERT
    assert entered.new == {"id": 1, "color": "blue", "n": 2}  # a real value, not UNCHANGED


def test_subscription_needs_the_old_values_of_filtered_fields():
    # REPLICA IDENTITY DEFAULT: the old row holds only the key.
    change = update("public.t", {"id": 1, "color": "blue"}, {"id": 1}, key={"id": 1}, position=5)
    with pytest.raises(PipelineError, match="REPLICA IDENTITY FULL") as info:
        BLUE(change)
    assert "color" in str(info.value) and "5" in str(info.value)
    with pytest.raises(PipelineError, match="pre-images"):
        BLUE(delete("t", {"id": 1}, key={"id": 1}))
    # A filter on the key alone works with the key alone.
    assert subscription(["==", "id", 1])(change) is change


def test_subscription_a_whole_old_row_may_lack_a_field_like_a_document():
    change = update("t", {"_id": 1, "color": "blue"}, {"_id": 1, "size": 3}, key={"_id": 1})
    assert BLUE(change).operation is Operation.INSERT


def test_stages_pickle_for_spawned_processes():
    stages = [BLUE, project(["id"]), to_delta("T"), route({"t": to_delta("T")})]
    copies = pickle.loads(pickle.dumps(stages))
    change = insert("t", {"id": 1, "color": "blue"})
    assert [s.name for s in copies] == [s.name for s in stages]
    assert copies[0](change) == change
