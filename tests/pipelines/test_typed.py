"""typed(Model): changes as events with model instances, strict and lenient."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from feeds import FAST_RETRY
from waiting import wait_until

from changefeed import UNCHANGED, Message, Operation, PipelineError
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.pipelines import Pipeline
from changefeed.pipelines.typed import TypedChange, TypedRowError, typed
from changefeed.testing import ListSink, delete, insert, update


@dataclass
class Task:
    id: int
    title: str
    done: bool = False
    tags: list[str] = field(default_factory=list)


class Plain:
    """Not a dataclass: a constructor with keyword arguments."""

    def __init__(self, id: int, title: str, *, done: bool = False) -> None:
        self.id, self.title, self.done = id, title, done

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plain) and vars(self) == vars(other)


class Loose:
    def __init__(self, id: int, **rest: Any) -> None:
        self.id, self.rest = id, rest


T = "public.tasks"


def test_inserts_updates_and_deletes_become_model_instances():
    stage = typed(Task)
    event = stage(insert(T, {"id": 1, "title": "a", "done": False, "tags": []}, key={"id": 1},
                         position="p1"))
    assert isinstance(event, TypedChange) and event.operation is Operation.INSERT
    assert event.new == Task(1, "a") and event.old is None and event.position == "p1"
    full = stage(update(T, {"id": 1, "title": "b", "done": True, "tags": ["x"]},
                        {"id": 1, "title": "a", "done": False, "tags": []}, key={"id": 1}))
    assert (full.new, full.old) == (Task(1, "b", True, ["x"]), Task(1, "a"))
    gone = stage(delete(T, {"id": 1, "title": "b", "done": True, "tags": []}, key={"id": 1}))
    assert gone.new is None and gone.old == Task(1, "b", True)


@pytest.mark.parametrize("model", [Task, Plain])
def test_a_key_only_old_row_is_not_made_into_a_model(model):
    stage = typed(model, strict=True)
    event = stage(update(T, {"id": 1, "title": "b", "done": True}, {"id": 1}, key={"id": 1}))
    assert event.old is None and event.key == {"id": 1}
    assert stage(delete(T, {"id": 1}, key={"id": 1})).old is None


@pytest.mark.parametrize("model", [Task, Plain])
def test_strict_refuses_unknown_columns_missing_fields_and_unchanged_values(model):
    stage = typed(model)
    row = {"id": 1, "title": "a", "done": False}
    with pytest.raises(TypedRowError, match="column\\(s\\) extra are not fields"):
        stage(insert(T, {**row, "extra": 1}, position="p"))
    with pytest.raises(TypedRowError, match="field\\(s\\) title have no column"):
        stage(insert(T, {"id": 1}, position="p"))
    with pytest.raises(TypedRowError, match="title are unchanged TOASTed.*REPLICA IDENTITY FULL"):
        stage(update(T, {**row, "title": UNCHANGED}, {"id": 1}, key={"id": 1}))
    with pytest.raises(TypedRowError, match="public.tasks at position 'p'"):
        stage(insert(T, {"id": 1}, position="p"))


def test_fields_with_defaults_may_miss_even_when_strict():
    assert typed(Task)(insert(T, {"id": 1, "title": "a"})).new == Task(1, "a")


@pytest.mark.parametrize("model", [Task, Plain])
def test_lenient_drops_unknown_columns_fills_missing_fields_and_marks_unchanged(model):
    stage = typed(model, strict=False)
    assert stage(insert(T, {"id": 1, "title": "a", "extra": 1})).new == model(id=1, title="a")
    assert stage(insert(T, {"id": 2})).new == model(id=2, title=None)
    event = stage(update(T, {"id": 1, "title": UNCHANGED, "done": True}, {"id": 1},
                         key={"id": 1}))
    assert event.new.title is UNCHANGED and event.new.done is True


def test_a_model_taking_any_keyword_gets_every_column():
    event = typed(Loose)(insert(T, {"id": 1, "title": "a", "extra": 2}))
    assert event.new.id == 1 and event.new.rest == {"title": "a", "extra": 2}


def test_a_model_refusing_a_row_is_reported():
    @dataclass
    class Checked:
        id: int

        def __post_init__(self) -> None:
            if self.id < 0:
                raise ValueError("negative id")

    with pytest.raises(TypedRowError, match="Checked refused the row: ValueError: negative id"):
        typed(Checked)(insert(T, {"id": -1}))


def test_other_tables_and_messages_pass_through_when_a_table_is_named():
    stage = typed(Task, table=T)
    other = insert("public.notes", {"id": 1, "body": "x"})
    message = Message("p", b"x", "1")
    assert stage(other) is other and stage(message) is message
    assert isinstance(stage(insert(T, {"id": 1, "title": "a"})), TypedChange)


# -- against a real server -------------------------------------------------------------------

pg_mark = pytest.mark.postgres


@dataclass
class Item:
    id: int
    name: str
    price: Decimal | None = None


def wait_until_slot_is_free(pg_dsn, slot="changefeed_items", timeout=10.0):
    """A feed that just stopped leaves its walsender exiting for a moment."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        wait_until(lambda: conn.execute("SELECT active FROM pg_replication_slots"
                                        " WHERE slot_name = %s", [slot]).fetchone() != (True,),
                   "the slot to be free", timeout)


def run(pg_dsn, stages, dead_letter=None):
    wait_until_slot_is_free(pg_dsn)
    feed = PostgresChangeFeed("items", connection=pg_dsn, retry=FAST_RETRY)
    sink = ListSink()
    pipeline = Pipeline(feed, stages, sink=sink, dead_letter=dead_letter)
    try:
        pipeline.run(idle_timeout=1.0, timeout=30)
    finally:
        feed.close()  # after a failure too (as the CLI does): frees the slot at once
    return sink.items


@pg_mark
def test_added_and_dropped_columns_strict_and_lenient(pg_dsn, pg):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)")
    run(pg_dsn, [typed(Item)])
    pg.execute("INSERT INTO items VALUES (1, 'a', 1.5)")
    pg.execute("ALTER TABLE items ADD COLUMN color text")
    pg.execute("INSERT INTO items VALUES (2, 'b', 2, 'red')")
    pg.execute("ALTER TABLE items DROP COLUMN price")
    pg.execute("INSERT INTO items VALUES (3, 'c', 'blue')")
    pg.execute("ALTER TABLE items DROP COLUMN color, DROP COLUMN name")
    pg.execute("INSERT INTO items VALUES (4)")

    dead = ListSink()
    strict = run(pg_dsn, [typed(Item)], dead_letter=dead)  # the slot keeps it all: read again
    assert [e.new for e in strict] == [Item(1, "a", Decimal("1.5"))]
    assert [d["change"]["new"]["id"] for d in dead.items] == [2, 3, 4]
    assert "color are not fields of Item" in dead.items[0]["error"]
    assert "name have no column" in dead.items[2]["error"]


@pg_mark
def test_lenient_rows_follow_the_table_through_its_migrations(pg_dsn, pg):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)")
    feed = PostgresChangeFeed("items", connection=pg_dsn, retry=FAST_RETRY)
    list(feed.changes(timeout=0.3))
    pg.execute("INSERT INTO items VALUES (1, 'a', 1.5)")
    pg.execute("ALTER TABLE items ADD COLUMN color text")
    pg.execute("INSERT INTO items VALUES (2, 'b', 2, 'red')")
    pg.execute("ALTER TABLE items DROP COLUMN price, DROP COLUMN name")
    pg.execute("INSERT INTO items VALUES (3, 'blue')")
    sink = ListSink()
    Pipeline(feed, [typed(Item, strict=False)], sink=sink).run(idle_timeout=1.0, timeout=30)
    assert [e.new for e in sink.items] == [
        Item(1, "a", Decimal("1.5")), Item(2, "b", Decimal(2)), Item(3, None, None)]


@pg_mark
def test_without_a_dead_letter_a_strict_mismatch_stops_before_the_change(pg_dsn, pg):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
    run(pg_dsn, [typed(Item)])
    pg.execute("INSERT INTO items VALUES (1, 'a')")
    pg.execute("ALTER TABLE items ADD COLUMN color text")
    pg.execute("INSERT INTO items VALUES (2, 'b', 'red')")
    with pytest.raises(PipelineError, match="typed\\(Item\\).*color are not fields"):
        run(pg_dsn, [typed(Item)])
    # The first change was delivered and acknowledged; the refused one waits for a fix.
    assert [e.new.id for e in run(pg_dsn, [typed(Item, strict=False)])] == [2]


@pg_mark
def test_unchanged_toast_values_strict_and_lenient(pg_dsn, pg):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)")
    pg.execute("ALTER TABLE items ALTER COLUMN name SET STORAGE EXTERNAL")  # TOAST, no compression
    big = "x" * 10_000
    run(pg_dsn, [typed(Item)])
    pg.execute("INSERT INTO items VALUES (1, %s, 1)", [big])
    pg.execute("UPDATE items SET price = 2 WHERE id = 1")  # name not resent
    lenient = run(pg_dsn, [typed(Item, strict=False)])
    assert lenient[0].new.name == big
    assert lenient[1].new.name is UNCHANGED and lenient[1].new.price == Decimal(2)
    pg.execute("UPDATE items SET price = 3 WHERE id = 1")
    with pytest.raises(PipelineError, match="name are unchanged TOASTed"):
        run(pg_dsn, [typed(Item)])
    pg.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    pg.execute("UPDATE items SET price = 4 WHERE id = 1")
    events = run(pg_dsn, [typed(Item, strict=False)])  # the refused one first, then FULL's
    assert events[-1].new == Item(1, big, Decimal(4)) and events[-1].old.price == Decimal(3)
