"""The one list of output formats (`changefeed.formats.registry`): every facet of every format
agrees with the others, and the CLI offers exactly the formats it lists."""

from __future__ import annotations

import datetime as dt
import doctest
import pickle

import orjson
import pytest

from changefeed import UNCHANGED, ConfigurationError
from changefeed.cli import cli
from changefeed.cli.run import encoder
from changefeed.formats import registry
from changefeed.formats.codec import dumps, dumps_line
from changefeed.formats.registry import FORMAT_NAMES, FORMATS, FormatOptions, format_named
from changefeed.testing import delete, insert, update

COMMITTED = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
CHANGES = [
    insert("public.tasks", {"id": 1, "title": "one"}, key={"id": 1},
           position="0000000000000010:00000000", transaction=7, committed_at=COMMITTED),
    update("public.tasks", {"id": 1, "title": "uno", "body": UNCHANGED}, {"id": 1},
           key={"id": 1}, position="0000000000000010:00000001", transaction=7,
           committed_at=COMMITTED),
    delete("app.line_items", {"id": 2}, key={"id": 2}, position="0000000000000020:00000000",
           transaction=8, committed_at=COMMITTED),
    insert("tasks", {"id": 3}),  # no key, no position: a RethinkDB change, say
]
OPTIONS = FormatOptions(model={"public.tasks": "Task"}, url="postgresql://db/shop")


def without_event_time(line: bytes) -> dict:
    """The decoded line, without Debezium's top-level ``ts_ms`` (the moment it was made)."""
    value = orjson.loads(line)
    if isinstance(value, dict) and "op" in value:
        value.pop("ts_ms")
    return value


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_NAMES)
def test_a_format_s_lines_are_its_items_as_json_lines(fmt):
    lines, items = fmt.lines(OPTIONS), fmt.items(OPTIONS)
    for change in CHANGES:
        line = lines(change)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert without_event_time(line) == without_event_time(dumps_line(items(change)))


@pytest.mark.parametrize("fmt", [known for known in FORMATS if known.readable],
                         ids=[known.name for known in FORMATS if known.readable])
def test_a_readable_format_gives_back_the_change_from_its_record(fmt):
    items = fmt.items(OPTIONS)
    for change in CHANGES:
        key = fmt.key(change)
        back = fmt.read(orjson.loads(dumps(items(change))),
                        None if key is None else dumps(key))
        # Debezium's source always names a schema: a table without one is in public.
        table = change.table if "." in change.table else f"public.{change.table}"
        assert (back.operation, back.key) == (change.operation, change.key)
        assert back.table == (table if fmt.name == "debezium" else change.table)
        assert back.new == change.new and back.committed_at == change.committed_at


def test_only_the_delta_cannot_be_read_back():
    assert [known.name for known in FORMATS if not known.readable] == ["delta"]


def test_the_formats_stages_make_their_items_and_are_named_and_picklable():
    change = CHANGES[0]
    assert format_named("change").stage(OPTIONS) is None  # sinks write a change so themselves
    delta = format_named("delta").stage(FormatOptions(model="Task"))
    assert delta.name == "to_delta(model='Task')"
    assert delta(change) == {"type": "insert", "model": "Task",
                             "data": {"id": 1, "title": "one"}}
    assert pickle.loads(pickle.dumps(delta))(change) == delta(change)
    envelope = format_named("debezium").stage(OPTIONS)(change)
    assert (envelope["op"], envelope["source"]["db"]) == ("c", "shop")


@pytest.mark.parametrize("name", ["avro", "Delta", "", "deltas"])
def test_an_unknown_format_names_every_known_one(name):
    with pytest.raises(ConfigurationError, match="use one of change, delta, debezium"):
        format_named(name)
    with pytest.raises(ConfigurationError, match="use one of change, delta, debezium"):
        encoder(name, None)


@pytest.mark.parametrize("command", ["run", "demo"])
def test_the_cli_offers_exactly_the_listed_formats(command):
    [option] = [p for p in cli.commands[command].params if p.name == "fmt"]
    assert tuple(option.type.choices) == FORMAT_NAMES
    assert option.default == "delta"


def test_the_registry_examples():
    result = doctest.testmod(registry)
    assert result.attempted > 0 and result.failed == 0
