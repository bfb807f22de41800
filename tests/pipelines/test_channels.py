"""Typed channels: envelopes, validation on both ends, upcasting, and notify() on a real server."""

from __future__ import annotations

import enum
import inspect
import json
import re
import signal
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from clitools import run_cli, start_cli

from changefeed import ChangeFeed, Message, PipelineError
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.pipelines import Pipeline
from changefeed.pipelines.channels import (
    CHANNEL_PREFIX,
    Channel,
    ChannelError,
    Notification,
    UnknownChannel,
    UnknownVersion,
    alembic,
    decode,
    django,
    encode,
    notify,
    receive,
)
from changefeed.testing import ListSink, insert

# -- declarations ----------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Address:
    street: str
    zip: str | None = None


class Everything(Channel, name="test.everything", version=1):
    n: int
    x: float
    s: str
    flag: bool
    at: datetime
    naive: datetime
    day: date
    clock: time
    span: timedelta
    amount: Decimal
    ident: uuid.UUID
    raw: bytes
    color: Color
    address: Address
    tags: set[str]
    pair: tuple[int, str]
    scores: dict[str, list[int]]
    maybe: int | None = None
    history: list[Address] = field(default_factory=list)


def everything() -> Everything:
    return Everything(
        n=2**53 + 1, x=0.1, s="h\u00e9 \"q\"", flag=True,
        at=datetime(2024, 2, 29, 12, 0, 1, 5, tzinfo=timezone.utc),
        naive=datetime(2024, 2, 29, 12, 0), day=date(2024, 2, 29), clock=time(23, 59, 59),
        span=timedelta(days=1, seconds=3), amount=Decimal("12345678901234567890.000000001"),
        ident=uuid.uuid4(), raw=b"\x00\xff", color=Color.BLUE,
        address=Address("Main St 1", "1000"), tags={"a", "b"}, pair=(1, "x"),
        scores={"k": [1, 2]}, history=[Address("Old Rd")],
    )


class OrderV1(Channel, name="orders.created", version=1):
    order_id: int


class OrderV3(Channel, name="orders.created", version=3):
    order_id: int
    currency: str
    total: Decimal


@OrderV3.upcaster(from_version=1)
def _add_currency(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "currency": "EUR"}


@OrderV3.upcaster(from_version=2)
def _add_total(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "total": "0"}


class Shipped(Channel, name="orders.shipped"):
    order_id: int
    at: datetime


def test_every_supported_type_survives_the_round_trip():
    event = everything()
    note = decode(encode(event, db_version="0042"), [Everything], position="p")
    assert note.payload == event and isinstance(note.payload, Everything)
    assert (note.channel, note.version, note.db_version, note.position) == (
        "test.everything", 1, "0042", "p")
    assert note.payload.amount.as_tuple() == event.amount.as_tuple()  # no digit lost
    assert note.payload.naive.tzinfo is None and note.payload.at.tzinfo is not None


def test_the_envelope_is_plain_json_with_a_fresh_id_per_notification():
    first = msgspec.json.decode(encode(Shipped(7, datetime(2024, 1, 1, tzinfo=timezone.utc))))
    second = msgspec.json.decode(encode(Shipped(7, datetime(2024, 1, 1, tzinfo=timezone.utc))))
    assert set(first) == {"id", "channel", "version", "db_version", "sent_at", "payload"}
    assert first["payload"] == {"order_id": 7, "at": "2024-01-01T00:00:00Z"}
    assert first["channel"] == "orders.shipped" and first["version"] == 1
    assert uuid.UUID(first["id"]) and first["id"] != second["id"]


def test_a_channel_is_a_dataclass_frozen_on_request_and_may_be_decorated_too():
    class Frozen(Channel, name="test.frozen", version=4, frozen=True):
        a: int

    @dataclass
    class Decorated(Channel, name="test.decorated"):
        a: int
        b: list[int] = field(default_factory=list)

    assert Decorated(1) == Decorated(a=1, b=[])
    assert decode(encode(Decorated(2, [3])), [Decorated]).payload == Decorated(2, [3])

    assert Frozen(1) == Frozen(a=1)
    with pytest.raises(AttributeError):
        Frozen(1).a = 2  # type: ignore[misc]
    assert (Frozen.channel_name, Frozen.channel_version) == ("test.frozen", 4)
    assert Frozen.prefix() == CHANNEL_PREFIX + "test.frozen"
    # Fields named like the class keywords are plain fields.
    named = type("Named", (Channel,), {"__annotations__": {"name": str, "version": int}},
                 name="test.named")
    assert named(name="x", version=9).version == 9 and named.channel_version == 1


@pytest.mark.parametrize("keywords, message", [
    ({}, "needs a name"),
    ({"name": ""}, "non-empty"),
    ({"name": "a b"}, "without spaces"),
    ({"name": "x", "version": 0}, ">= 1"),
    ({"name": "x", "version": "2"}, ">= 1"),
])
def test_bad_declarations_are_clear_errors(keywords, message):
    with pytest.raises(TypeError, match=message):
        type("Bad", (Channel,), {}, **keywords)


def test_a_subclass_is_the_same_channel_unless_it_says_otherwise():
    class Extended(OrderV3):
        note: str = ""

    class Next(OrderV3, version=4):
        note: str = ""

    assert (Extended.channel_name, Extended.channel_version) == ("orders.created", 3)
    assert (Next.channel_name, Next.channel_version) == ("orders.created", 4)
    assert Next._upcasters == {} and len(OrderV3._upcasters) == 2


def test_an_upcaster_outside_the_versions_is_refused():
    with pytest.raises(TypeError, match="between 1 and 2"):
        OrderV3.upcaster(from_version=3)
    with pytest.raises(TypeError, match="between 1 and 0"):
        OrderV1.upcaster(from_version=1)


# -- validation on sending -------------------------------------------------------------------


@pytest.mark.parametrize("change, where", [
    ({"n": "1"}, "$.n"),
    ({"n": True}, "$.n"),
    ({"s": 5}, "$.s"),
    ({"at": "yesterday"}, "$.at"),
    ({"address": Address(street=3)}, "$.address.street"),
    ({"history": [Address("ok"), Address(None)]}, "$.history[1].street"),
    ({"tags": {1}}, "$.tags[0]"),
    ({"scores": {"k": ["x"]}}, "$.scores"),
])
def test_a_payload_of_the_wrong_type_is_refused_naming_the_field(change, where):
    event = everything()
    for name, value in change.items():
        setattr(event, name, value)
    with pytest.raises(ChannelError, match=r"channel test\.everything version 1: .*") as info:
        encode(event)
    assert where in info.value.message or where.split("[")[0] in info.value.message


def test_a_value_that_cannot_be_encoded_is_refused():
    event = everything()
    event.s = object()  # type: ignore[assignment]
    with pytest.raises(ChannelError, match="cannot encode the payload.*object"):
        encode(event)


def test_an_async_connection_is_refused_before_anything_runs():
    class AsyncLike:  # the shape of psycopg.AsyncConnection: coroutine methods
        async def execute(self, query, params=None):
            raise AssertionError("never called")

    with pytest.raises(ChannelError, match="synchronous connection"):
        notify(AsyncLike(), OrderV1(1), db_version=lambda conn: pytest.fail("not read"))
    assert inspect.iscoroutinefunction(psycopg.AsyncConnection.execute)


def test_only_channel_instances_are_sent():
    with pytest.raises(ChannelError, match="Channel instances"):
        encode(Address("x"))  # type: ignore[arg-type]


class Loose(Channel, name="test.loose"):
    data: Any
    amount: Decimal = Decimal(0)
    ratio: float = 0.0


@pytest.mark.parametrize("number", [
    "1.00000000000000000001", "12345678901234567890123", "-0.0", "1E+400", "1e-400",
    "-123456789012345678901234567890.5",
])
def test_numbers_keep_their_digits_in_fields_typed_any_and_decimal(number):
    content = json.dumps({
        "id": str(uuid.uuid4()), "channel": "test.loose", "version": 1,
        "sent_at": "2024-06-01T12:00:00Z",
        "payload": {"data": {"n": "X", "list": ["X"]}, "amount": "X", "ratio": 0.5},
    }).replace('"X"', number).encode()
    got = decode(content, [Loose]).payload
    for value in (got.data["n"], got.data["list"][0], got.amount):
        assert str(value) == str(Decimal(number)) or str(value) == number  # every digit
        assert isinstance(value, (int, Decimal)) and not isinstance(value, bool)
    assert got.ratio == 0.5 and isinstance(got.ratio, float)


def nested_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [200, 1000, 20000])
def test_a_payload_too_deep_is_refused_on_both_sides_with_one_error(depth):
    with pytest.raises(ChannelError, match="nests deeper than 199 levels"):
        encode(Loose(nested_list(depth)))
    content = b'{"id":"x","channel":"test.loose","version":1,"sent_at":"2024-06-01T12:00:00Z",' \
        b'"payload":{"data":' + b"[" * depth + b"]" * depth + b"}}"
    with pytest.raises(ChannelError, match="nests deeper than 199 levels"):
        decode(content, [Loose])


def test_a_payload_as_deep_as_allowed_goes_through():
    event = Loose(nested_list(198))
    assert decode(encode(event), [Loose]).payload == event


# -- validation and upcasting on receiving ---------------------------------------------------


def envelope(channel="orders.created", version=1, payload=None, **extra) -> bytes:
    document = {"id": "i", "channel": channel, "version": version, "db_version": None,
                "sent_at": "2024-01-01T00:00:00Z", "payload": payload or {"order_id": 1}}
    document.update(extra)
    return msgspec.json.encode(document)


def test_older_versions_go_through_the_upcasters_in_order():
    assert decode(envelope(version=1), [OrderV3]).payload == OrderV3(1, "EUR", Decimal(0))
    v2 = envelope(version=2, payload={"order_id": 2, "currency": "CHF"})
    assert decode(v2, [OrderV3]).payload == OrderV3(2, "CHF", Decimal(0))
    v3 = envelope(version=3, payload={"order_id": 3, "currency": "USD", "total": "1.5"})
    note = decode(v3, [OrderV3])
    assert note.payload == OrderV3(3, "USD", Decimal("1.5")) and note.version == 3


def test_the_listener_uses_the_highest_version_it_is_given():
    stage = receive(OrderV1, OrderV3)
    assert stage.channels["orders.created"] is OrderV3
    stage = receive(OrderV3, OrderV1)
    assert stage.channels["orders.created"] is OrderV3


@pytest.mark.parametrize("content, error, message", [
    (envelope(channel="orders.cancelled"), UnknownChannel, "unknown channel 'orders.cancelled'"),
    (envelope(version=4), UnknownVersion, "version 4 is newer than this listener's"),
])
def test_unknown_channels_and_versions(content, error, message):
    with pytest.raises(error, match=message):
        decode(content, [OrderV3, Shipped])


def test_a_missing_upcaster_names_the_version():
    class Gap(Channel, name="test.gap", version=3):
        a: int

    @Gap.upcaster(from_version=2)
    def _two_to_three(payload):
        return payload

    with pytest.raises(UnknownVersion, match="no upcaster from version 1"):
        decode(envelope(channel="test.gap", payload={"a": 1}), [Gap])
    assert decode(envelope(channel="test.gap", version=2, payload={"a": 1}), [Gap]).payload.a == 1


@pytest.mark.parametrize("content, message", [
    (envelope(payload={"order_id": "1"}), r"Expected `int`, got `str` - at `\$.order_id`"),
    (envelope(payload={"order_id": 1, "extra": 2}), "unknown field.*extra"),
    (envelope(payload={"other": 1}), "unknown field.*other"),
    (envelope(version=3, payload={"order_id": 1, "currency": "X"}), "missing required.*total"),
    (b"not json", "not a channel envelope"),
    (b'{"channel": "orders.created"}', "not a channel envelope"),
])
def test_payloads_that_do_not_match_are_refused(content, message):
    with pytest.raises(ChannelError, match=message):
        decode(content, [OrderV3])


def test_a_failing_upcaster_is_reported():
    class Broken(Channel, name="test.broken", version=2):
        a: int

    @Broken.upcaster(from_version=1)
    def _fail(payload):
        raise KeyError("b")

    with pytest.raises(ChannelError, match="upcaster from version 1 failed: KeyError"):
        decode(envelope(channel="test.broken", payload={"a": 1}), [Broken])


# -- the stage in a pipeline -----------------------------------------------------------------


class ListFeed(ChangeFeed):
    """Hands out the given items (changes and messages) once, in order."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__("items")
        self.items = items

    def run_changefeed(self) -> Iterator[Any]:
        yield from self.items


def channel_message(content: bytes, position: str) -> Message:
    name = msgspec.json.decode(content)["channel"]
    return Message(CHANNEL_PREFIX + name, content, position)


def test_the_stage_turns_channel_messages_into_notifications_and_passes_the_rest():
    row = insert("public.orders", {"id": 1}, position="1")
    other = Message("app.other", b"{}", "2")
    sent = encode(OrderV1(5))
    sink = ListSink()
    feed = ListFeed([row, other, channel_message(sent, "3")])
    Pipeline(feed, [receive(OrderV3)], sink=sink).run()
    assert sink.items[:2] == [row, other]
    note = sink.items[2]
    assert isinstance(note, Notification) and note.payload == OrderV3(5, "EUR", Decimal(0))
    assert note.position == "3" and note.id == msgspec.json.decode(sent)["id"]
    assert feed.acknowledged == "3"


def test_unknown_notifications_go_to_the_dead_letter_and_the_rest_goes_on():
    sink, dead = ListSink(), ListSink()
    feed = ListFeed([channel_message(envelope(channel="nobody"), "1"),
                     channel_message(envelope(version=9), "2"),
                     channel_message(envelope(), "3")])
    Pipeline(feed, [receive(OrderV3)], sink=sink, dead_letter=dead).run()
    assert [n.payload.order_id for n in sink.items] == [1]
    assert [d["error"] for d in dead.items] == [
        "unknown channel 'nobody' (version 1); this listener knows: orders.created",
        "orders.created version 9 is newer than this listener's (version 3): deploy the"
        " listener's new version first",
    ]
    assert feed.acknowledged == "3"


def test_without_a_dead_letter_an_unknown_notification_stops_the_pipeline():
    sink = ListSink()
    feed = ListFeed([channel_message(envelope(), "1"),
                     channel_message(envelope(channel="nobody"), "2"),
                     channel_message(envelope(), "3")])
    with pytest.raises(PipelineError, match="position '2'.*unknown channel 'nobody'"):
        Pipeline(feed, [receive(OrderV3)], sink=sink).run()
    assert len(sink.items) == 1 and feed.acknowledged == "1"


@pytest.mark.parametrize("content, error", [
    (envelope(payload={"order_id": "bad"}), "order_id"),
    (envelope(version=7), "version 7 is newer"),
])
def test_skip_drops_unknown_channels_only(content, error):
    sink = ListSink()
    feed = ListFeed([channel_message(envelope(channel="nobody"), "1"),
                     channel_message(content, "2")])
    with pytest.raises(PipelineError, match=f"position '2'.*{error}"):
        Pipeline(feed, [receive(OrderV3, unknown="skip")], sink=sink).run()
    assert sink.items == [] and feed.acknowledged == "1"


def test_a_notification_under_another_channels_prefix_is_refused():
    message = Message(CHANNEL_PREFIX + "orders.shipped", envelope(), "1")
    with pytest.raises(ChannelError, match="channel orders.created came under the prefix"):
        receive(OrderV3, Shipped)(message)


# -- against a real server -------------------------------------------------------------------

pg_mark = pytest.mark.postgres


@pytest.fixture
def orders(pg):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
    return pg


def listen(dsn, *channels, ack=True, idle=1.5):
    feed = PostgresChangeFeed("orders", connection=dsn, messages=[CHANNEL_PREFIX])
    stage = receive(*channels)
    got = []
    for item in feed.changes(idle_timeout=idle, timeout=30):
        got.append(stage(item))
        if ack:
            feed.ack(item.position)
    feed.close()
    return got


@pg_mark
def test_notify_commits_and_rolls_back_with_the_callers_transaction(pg_dsn, orders):
    listen(pg_dsn, OrderV3)  # the slot exists from here on
    with psycopg.connect(pg_dsn) as conn:  # not autocommit: a transaction per block
        conn.execute("INSERT INTO orders VALUES (1, 10)")
        kept = notify(conn, OrderV3(1, "EUR", Decimal("10.00")))
        conn.commit()
        conn.execute("INSERT INTO orders VALUES (2, 20)")
        notify(conn, OrderV3(2, "EUR", Decimal("20.00")))
        conn.rollback()
    notify(orders, Shipped(1, datetime(2024, 5, 1, tzinfo=timezone.utc)))  # autocommit
    got = listen(pg_dsn, OrderV3, Shipped)
    assert [type(g).__name__ for g in got] == ["Change", "Notification", "Notification"]
    assert got[1].id == kept and got[1].payload == OrderV3(1, "EUR", Decimal("10.00"))
    assert got[1].position > got[0].position
    assert got[2].payload == Shipped(1, datetime(2024, 5, 1, tzinfo=timezone.utc))


@pg_mark
def test_redelivered_notifications_keep_their_ids(pg_dsn, orders):
    listen(pg_dsn, OrderV3)
    ids = [notify(orders, OrderV1(n)) for n in range(3)]
    first = listen(pg_dsn, OrderV3, ack=False)
    again = listen(pg_dsn, OrderV3, ack=False)  # a new feed: as after a crash
    assert [n.id for n in first] == [n.id for n in again] == ids
    assert [n.position for n in first] == [n.position for n in again]
    assert [n.payload.order_id for n in again] == [0, 1, 2]


@pg_mark
def test_a_consumer_killed_mid_stream_gets_every_notification_with_the_same_id(pg_dsn, orders):
    args = ["run", "orders", "--url", pg_dsn, "--messages", CHANNEL_PREFIX, "-q"]
    run_cli(*args, "--until-idle", "0.5")
    sent = []
    for n in range(100):
        with psycopg.connect(pg_dsn) as conn:
            conn.execute("INSERT INTO orders VALUES (%s, %s)", [n, n])
            sent.append(notify(conn, OrderV3(n, "EUR", Decimal(n))))
    with start_cli(*args) as process:
        lines = process.read_json(5)
        _, rest = process.stop(signal.SIGKILL)
    lines += [json.loads(line) for line in rest.splitlines()]
    lines += [json.loads(line) for line in run_cli(*args, "--until-idle", "1").stdout.splitlines()]
    envelopes = {}
    for line in lines:
        if line.get("type") == "message":
            content = line["content"]
            assert envelopes.setdefault(line["position"], content) == content  # same each time
    assert sorted(e["id"] for e in envelopes.values()) == sorted(sent)
    notes = [decode(msgspec.json.encode(e), [OrderV3]) for e in envelopes.values()]
    assert sorted(n.payload.order_id for n in notes) == list(range(100))


@pg_mark
def test_a_bad_payload_sends_nothing_and_leaves_the_transaction_usable(pg_dsn, orders):
    listen(pg_dsn, OrderV3)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1, 10)")
        with pytest.raises(ChannelError, match=r"\$\.order_id"):
            notify(conn, OrderV1("one"))  # type: ignore[arg-type]
        notify(conn, OrderV1(1))
        conn.commit()
    got = listen(pg_dsn, OrderV3)
    assert [type(g).__name__ for g in got] == ["Change", "Notification"]


@pg_mark
def test_db_version_from_alembic_django_or_a_value(pg_dsn, orders):
    listen(pg_dsn, OrderV3)
    notify(orders, OrderV1(1), db_version="release-7")
    orders.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    orders.execute("INSERT INTO alembic_version VALUES ('ae1027a6acf')")
    notify(orders, OrderV1(2), db_version=alembic())
    orders.execute("INSERT INTO alembic_version VALUES ('1975ea83b712')")  # two heads
    notify(orders, OrderV1(3), db_version=alembic())
    orders.execute(
        "CREATE TABLE django_migrations (id serial PRIMARY KEY, app varchar(255),"
        " name varchar(255), applied timestamptz)"
    )
    orders.execute(
        "INSERT INTO django_migrations (app, name, applied) VALUES"
        " ('shop', '0001_initial', '2024-01-01'), ('auth', '0012_x', '2024-01-02'),"
        " ('shop', '0002_currency', '2024-01-03'), ('auth', '0013_y', '2024-01-04')"
    )
    notify(orders, OrderV1(4), db_version=django("shop"))
    notify(orders, OrderV1(5), db_version=django())
    notify(orders, OrderV1(6))
    got = listen(pg_dsn, OrderV3)
    assert [n.db_version for n in got] == [
        "release-7", "ae1027a6acf", "1975ea83b712,ae1027a6acf", "shop.0002_currency",
        "auth.0013_y", None,
    ]


@pg_mark
def test_a_db_version_that_is_not_a_string_is_refused(pg_dsn, orders):
    with pytest.raises(ChannelError, match="db_version must be a string"):
        notify(orders, OrderV1(1), db_version=lambda conn: 42)


@pg_mark
def test_a_missing_db_version_table_is_a_clear_error_that_aborts_nothing(pg_dsn, orders):
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1, 10)")
        with pytest.raises(ChannelError, match="no table alembic_version"):
            notify(conn, OrderV1(1), db_version=alembic())
        with pytest.raises(ChannelError, match="no table django_migrations"):
            notify(conn, OrderV1(1), db_version=django("shop"))
        conn.execute("INSERT INTO orders VALUES (2, 20)")  # the transaction is still good
        conn.commit()
    assert orders.execute("SELECT count(*) FROM orders").fetchone() == (2,)


@pg_mark
def test_notify_through_a_cursor(pg_dsn, orders):
    listen(pg_dsn, OrderV3)
    with psycopg.connect(pg_dsn) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE alembic_version (version_num varchar(32))")
        cursor.execute("INSERT INTO alembic_version VALUES ('abc')")
        notify(cursor, OrderV1(9), db_version=alembic())
        conn.commit()
    (note,) = listen(pg_dsn, OrderV3)
    assert note.payload.order_id == 9 and note.db_version == "abc"


# -- the README's example --------------------------------------------------------------------

README = Path(__file__).parents[2] / "README.md"


@pg_mark
def test_the_readme_channels_example_runs_as_written(pg_dsn, monkeypatch):
    text = README.read_text()
    section = text[text.index("\n## Channels\n"):]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "notify(conn" in example and "receive(OrderCreated)" in example
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    module = types.ModuleType("readme_example")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    code = compile(example, str(README), "exec", dont_inherit=True)  # as a user's file runs it
    exec(code, namespace)  # its own asserts check the output
    assert len(namespace["received"]) == 3
    namespace["feed"].close()
