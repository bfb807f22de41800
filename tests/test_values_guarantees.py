"""The README's "Values (PostgreSQL)" guarantee against a real server: no value stops or blurs a
feed. json and jsonb nested 200 to 14,554 levels deep (the server's own limit), arrays and
objects, with numbers Python's float would round, in new rows, old rows (REPLICA IDENTITY FULL),
keys (a jsonb primary key) and messages, snapshot and streamed, come out exactly in every
format (``change``, ``delta``, ``debezium``) and through every sink (stdout, a file, a webhook,
Redis and Kafka read back by their feeds), one valid JSON line each; ``inet``/``cidr`` as
PostgreSQL writes them.

Every output is read back with `changefeed.formats.json_values.loads_document` (which checks it
is JSON without recursing) and compared with PostgreSQL's own text of the value, whitespace
outside strings aside.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import uuid
from decimal import Decimal

import psycopg
import pytest
from clitools import json_lines, run_cli
from psycopg import sql
from waiting import wait_until

from changefeed import Retry
from changefeed.backends.postgres import PostgresChangeFeed
from changefeed.formats.codec import dumps
from changefeed.formats.json_values import MAX_DEPTH, RawJson, loads_document
from changefeed.pipelines import Pipeline
from changefeed.pipelines.sinks import JsonLinesSink
from changefeed.pipelines.sinks.http import WebhookSink
from changefeed.testing import ListSink

pytestmark = pytest.mark.postgres

FAST = Retry(initial=0.05, maximum=0.5)
DEPTHS = [1, 200, 201, 254, 255, 256, 1000, 5000]
EXACT = "1.00000000000000000001"
BIG = "12345678901234567890123"


def nested(depth: int, kind: str) -> str:
    """``depth`` nested arrays or objects around numbers Python's float would round."""
    if kind == "array":
        return "[" * (depth - 1) + f"[{EXACT}, {BIG}, -0.0]" + "]" * (depth - 1)
    return '{"a": ' * (depth - 1) + f'{{"n": {EXACT}, "b": {BIG}}}' + "}" * (depth - 1)


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|\s+|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|[^"\s]',
                     re.DOTALL)


def canonical(text: str) -> str:
    """JSON text without whitespace outside strings (PostgreSQL's jsonb text has some), each
    number in one notation (``1e-400`` and ``1E-400`` are the same number; ``1.10`` and
    ``1.1``, ``-0`` and ``0`` stay apart)."""
    return "".join(str(Decimal(t)) if t[0] in "-0123456789" else t
                   for t in _TOKENS.findall(text) if not t.isspace())


def as_text(value) -> str:
    """A value read back from an output line, as JSON text (deep parts are `RawJson`)."""
    return canonical(dumps(value).decode())


@pytest.fixture(scope="module")
def server_max(pg_server) -> dict[str, int]:
    """How deep this server lets jsonb nest, arrays and objects (max_stack_depth decides)."""
    limits = {}
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for kind in ("array", "object"):
            low, high = 1000, 200_000
            while low < high:
                middle = (low + high + 1) // 2
                try:
                    conn.execute("SELECT %s::jsonb", [nested(middle, kind)])
                    low = middle
                except psycopg.errors.StatementTooComplex:
                    high = middle - 1
            limits[kind] = low
    assert limits["array"] > 10_000  # 14,554 and 13,099 with the default 2MB
    return limits


def depths(server_max, kind: str) -> list[int]:
    return [*DEPTHS, server_max[kind]]


def fill(pg, server_max) -> dict[int, tuple[str, int]]:
    """A table ``docs`` (REPLICA IDENTITY FULL) with one row per kind and depth."""
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, j jsonb, t json)")
    pg.execute("ALTER TABLE docs REPLICA IDENTITY FULL")
    rows = {}
    for kind in ("array", "object"):
        for depth in depths(server_max, kind):
            row = len(rows) + 1
            rows[row] = (kind, depth)
            pg.execute("INSERT INTO docs VALUES (%s, %s::jsonb, %s::json)",
                       [row, nested(depth, kind), nested(depth, kind)])
    return rows


def texts(pg) -> dict[int, tuple[str, str]]:
    return {row: (canonical(j), canonical(t)) for row, j, t in
            pg.execute("SELECT id, j::text, t::text FROM docs")}


def change_slot(pg_dsn, slot: str, fmt: str, *extra: str) -> list:
    result = run_cli("run", "docs", "--url", pg_dsn, "--slot", slot, "--format", fmt,
                     "--until-idle", "0.5", *extra, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert all(line.strip() for line in lines)
    return [loads_document(line.encode()) for line in lines]  # each a JSON document


def test_deep_and_exact_json_in_new_and_old_rows_in_every_format(pg, pg_dsn, server_max):
    rows = fill(pg, server_max)
    for fmt in ("change", "delta", "debezium"):  # a slot each, its snapshot taken now
        result = run_cli("run", "docs", "--url", pg_dsn, "--slot", f"s_{fmt}", "--prefeed",
                         "snapshot", "--format", fmt, "--until-idle", "0.5", timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [loads_document(line.encode()) for line in result.stdout.splitlines()]
        lines = [line for line in lines if line.get("type") != "snapshot"]  # markers
        snapshot = {_row(fmt, line)["id"]: _row(fmt, line) for line in lines}
        assert set(snapshot) == set(rows)
        assert {row: (as_text(r["j"]), as_text(r["t"])) for row, r in snapshot.items()} == \
            texts(pg)
    before = texts(pg)
    # Stream: each value replaced by one with other digits, then the rows deleted.
    for row, (kind, depth) in rows.items():
        value = nested(depth, kind)
        pg.execute("UPDATE docs SET j = %s::jsonb, t = %s::json WHERE id = %s",
                   [value.replace(EXACT, "2.50"),
                    value.replace(EXACT, "-0.000000000000000000001"), row])
    after = texts(pg)
    pg.execute("DELETE FROM docs")
    for fmt in ("change", "delta", "debezium"):
        lines = change_slot(pg_dsn, f"s_{fmt}", fmt)
        assert len(lines) == 2 * len(rows), fmt
        updates, deletes = lines[:len(rows)], lines[len(rows):]
        for line in updates:
            new, old = _row(fmt, line), _row(fmt, line, old=True)
            assert (as_text(new["j"]), as_text(new["t"])) == after[new["id"]], (fmt, new["id"])
            assert (as_text(old["j"]), as_text(old["t"])) == before[old["id"]], (fmt, old["id"])
        for line in deletes:
            old = _row(fmt, line, old=True)
            assert (as_text(old["j"]), as_text(old["t"])) == after[old["id"]], (fmt, old["id"])
    assert "2.50" in after[1][0] and "-1E-21" in after[1][1]


def _row(fmt: str, line: dict, old: bool = False) -> dict:
    if fmt == "change":
        return line["old" if old else "new"]
    if fmt == "delta":
        if line["type"] == "update":
            return line["oldData" if old else "newData"]
        return line["data"]
    return line["before" if old else "after"]


def test_python_values_stop_at_max_depth_and_deeper_ones_are_marked_raw(pg, pg_dsn, server_max):
    rows = fill(pg, server_max)
    feed = PostgresChangeFeed("docs", connection=pg_dsn, prefeed="snapshot", retry=FAST)
    got = {}
    for change in feed.changes(limit=len(rows), timeout=120):
        got[change.key["id"]] = change.new
        feed.ack(change.position)
    feed.close()
    for row, (kind, depth) in rows.items():
        for column, type_name in (("j", "jsonb"), ("t", "json")):
            value = got[row][column]
            if depth > MAX_DEPTH:
                assert isinstance(value, RawJson) and value.type == type_name
            else:
                assert not isinstance(value, RawJson)
                inner = value
                for _ in range(depth - 1):
                    inner = inner[0] if kind == "array" else inner["a"]
                numbers = inner[:2] if kind == "array" else [inner["n"], inner["b"]]
                assert [str(n) for n in numbers] == [EXACT, BIG]


@pytest.mark.parametrize("depth", [200, 255, 256, 800])
def test_a_deep_jsonb_primary_key_is_the_key_of_every_change(pg, pg_dsn, depth):
    # (A unique index on an expression is no replica identity; a jsonb column can be the key.
    # Deeper than about 820 levels the btree entry no longer fits: PostgreSQL refuses it.)
    pg.execute("CREATE TABLE keyed (j jsonb PRIMARY KEY, v int)")
    key = nested(depth, "array")
    assert run_cli("run", "keyed", "--url", pg_dsn, "--until-idle", "0.5").returncode == 0
    pg.execute("INSERT INTO keyed VALUES (%s, 1)", [key])
    pg.execute("UPDATE keyed SET v = 2")
    pg.execute("DELETE FROM keyed")
    (server_text,) = pg.execute("SELECT %s::jsonb::text", [key]).fetchone()
    result = run_cli("run", "keyed", "--url", pg_dsn, "--format", "change", "--until-idle", "0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [loads_document(line.encode()) for line in result.stdout.splitlines()]
    assert [line["operation"] for line in lines] == ["insert", "update", "delete"]
    for line in lines:
        assert as_text(line["key"]["j"]) == canonical(server_text)
    assert as_text(lines[2]["old"]["j"]) == canonical(server_text)  # the key: DEFAULT identity


def test_messages_keep_their_digits_and_depth(pg, pg_dsn, server_max):
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY)")
    assert run_cli("run", "docs", "--url", pg_dsn, "--messages", "m",
                   "--until-idle", "0.5").returncode == 0
    contents = [
        '{"a": 1.00000000000000000001, "b": 12345678901234567890123}',
        '{"huge": -123456789012345678901234567890.123456789, "tiny": 1e-400, "zero": -0,'
        ' "nested": [{"x": 0.1}, [1E+400]]}',
        "[" * 300 + "]" * 300,  # 300 nested brackets stopped a feed before
        *(nested(depth, kind) for kind in ("array", "object")
          for depth in depths(server_max, kind)),
        "[" * 300,  # not JSON: its text
        '"\\ud800"',  # json can hold a lone surrogate, UTF-8 cannot
    ]
    for content in contents:
        pg.execute("SELECT pg_logical_emit_message(true, 'm', %s)", [content])
    result = run_cli("run", "docs", "--url", pg_dsn, "--messages", "m", "--until-idle", "0.5",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [loads_document(line.encode()) for line in result.stdout.splitlines()]
    assert len(lines) == len(contents)
    for line, content in zip(lines, contents, strict=True):
        if content == "[" * 300:
            assert line["content"] == content  # a string: the text, not JSON
        else:
            assert as_text(line["content"]) == canonical(content)
    assert dumps(lines[1]["content"]).startswith(
        b'{"huge":-123456789012345678901234567890.123456789,"tiny":1E-400,"zero":-0,')


@pytest.fixture
def receiver():
    """A webhook receiver (tests/testservers.py) recording what it is sent."""
    from testservers import Receiver

    server = Receiver().start()
    yield server
    server.stop()


@pytest.mark.redis
def test_deep_values_through_a_file_a_webhook_and_redis_read_back(
    pg, pg_dsn, server_max, receiver, redis_url, tmp_path
):
    from changefeed.backends.redis_streams import RedisStreamFeed
    from changefeed.pipelines.sinks.redis import RedisStreamSink

    rows = fill(pg, server_max)
    expected = texts(pg)

    def run(sink) -> None:
        slot = f"s_{uuid.uuid4().hex[:8]}"
        feed = PostgresChangeFeed("docs", connection=pg_dsn, prefeed="snapshot", slot=slot,
                                  retry=FAST)
        assert Pipeline(feed, [], sink=sink).run(limit=len(rows), timeout=120) == len(rows)

    path = tmp_path / "out.jsonl"
    run(JsonLinesSink(str(path)))
    from_file = [loads_document(line.encode()) for line in path.read_text().splitlines()]
    run(WebhookSink(receiver.url))
    from_webhook = [item for _, body in receiver.accepted() for item in loads_document(body)]
    stream = f"s-{uuid.uuid4().hex[:8]}"
    run(RedisStreamSink(redis_url, stream))
    read_back = ListSink()
    Pipeline(RedisStreamFeed(redis_url, stream, group="g", consumer="c"), [],
             sink=read_back).run(limit=len(rows), timeout=60)
    again = tmp_path / "again.jsonl"  # what a worker's sink writes of what it read back
    Pipeline(RedisStreamFeed(redis_url, stream, group="g2", consumer="c"), [],
             sink=JsonLinesSink(str(again))).run(limit=len(rows), timeout=60)
    from_worker = [loads_document(line.encode()) for line in again.read_text().splitlines()]

    for name, items in (("file", from_file), ("webhook", from_webhook),
                        ("redis worker", from_worker)):
        got = {item["new"]["id"]: (as_text(item["new"]["j"]), as_text(item["new"]["t"]))
               for item in items}
        assert got == expected, name
    assert {c.new["id"]: (as_text(c.new["j"]), as_text(c.new["t"])) for c in read_back} \
        == expected


@pytest.mark.kafka
def test_deep_values_through_kafka_read_back(pg, pg_dsn, server_max, kafka_bootstrap, tmp_path):
    from kafkatools import FAST_GROUP

    from changefeed.backends.kafka import KafkaFeed
    from changefeed.pipelines.sinks.kafka import KafkaSink

    rows = fill(pg, server_max)
    expected = texts(pg)
    for fmt in ("change", "debezium"):
        topic = f"docs-{fmt}-{uuid.uuid4().hex[:6]}"
        feed = PostgresChangeFeed("docs", connection=pg_dsn, prefeed="snapshot",
                                  slot=f"s_{fmt}", retry=FAST)
        sink = KafkaSink(kafka_bootstrap, topic, fmt=fmt, config={"message.max.bytes": 10**7})
        assert Pipeline(feed, [], sink=sink).run(limit=len(rows), timeout=120) == len(rows)
        path = tmp_path / f"{fmt}.jsonl"
        worker = KafkaFeed(kafka_bootstrap, topic, f"g-{uuid.uuid4().hex[:6]}",
                           config=FAST_GROUP)
        Pipeline(worker, [], sink=JsonLinesSink(str(path))).run(limit=len(rows), timeout=120)
        items = [loads_document(line.encode()) for line in path.read_text().splitlines()]
        got = {item["new"]["id"]: (as_text(item["new"]["j"]), as_text(item["new"]["t"]))
               for item in items}
        assert got == expected, fmt


def test_inet_and_cidr_come_out_as_postgresql_writes_them(pg, pg_dsn):
    generator = random.Random(18)
    literals = ["::ffff:1.2.3.4/64", "::ffff:1.2.3.4", "::1.2.3.4", "::1", "::", "1::",
                "::2:0", "fe80::1:0:0:1", "1:0:0:1:0:0:0:1", "::ffff:0:0", "0:0:0:0:0:1:0:0",
                "2001:db8::", "1.2.3.4", "10.1.2.3/8", "0.0.0.0/0", "::ffff:1.2.3.0/120"]
    for _ in range(300):
        words = [generator.choice([0, 0, 1, 0xFFFF, generator.randrange(65536)])
                 for _ in range(8)]
        address = ipaddress.IPv6Address(sum(w << (112 - 16 * i) for i, w in enumerate(words)))
        literals.append(f"{address}{generator.choice(['', '/64', '/96', '/127', '/128'])}")
    pg.execute("CREATE TABLE nets (id int PRIMARY KEY, i inet, c cidr, a inet[])")
    assert run_cli("run", "nets", "--url", pg_dsn, "--until-idle", "0.5").returncode == 0
    for row, literal in enumerate(literals, 1):
        network = str(ipaddress.ip_network(literal, strict=False))
        pg.execute("INSERT INTO nets VALUES (%s, %s, %s, ARRAY[%s, %s]::inet[])",
                   [row, literal, network, literal, network])
    result = run_cli("run", "nets", "--url", pg_dsn, "--format", "change", "--until-idle", "0.5")
    lines = json_lines(result.stdout)
    assert len(lines) == len(literals), result.stderr[-2000:]
    server = {row: [i, c, json.loads(a.replace("{", "[").replace("}", "]"))] for row, i, c, a in
              pg.execute("SELECT id, format('%s', i), format('%s', c),"
                         " array_to_json(ARRAY(SELECT format('%s', x) FROM unnest(a) x))::text"
                         " FROM nets")}
    for line in lines:
        new = line["new"]
        assert [new["i"], new["c"], new["a"]] == server[new["id"]], new


def test_nothing_a_value_holds_stops_a_feed_after_it(pg, pg_dsn, server_max):
    # A deep value, a lone surrogate, a huge number, and a truncate between rows: the rows
    # after them arrive (before, a 255-deep value stopped the feed at the same change forever).
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, t json)")
    formats = ("delta", "change", "debezium")
    for fmt in formats:
        assert run_cli("run", "docs", "--url", pg_dsn, "--slot", f"s_{fmt}",
                       "--until-idle", "0.5").returncode == 0
    values = [nested(255, "array"), nested(server_max["object"] - 1, "object"), '"\\ud800"',
              "1" + "0" * 5000, '{"\\udc00": 1}']
    for row, value in enumerate(values, 1):
        pg.execute("INSERT INTO docs VALUES (%s, %s)", [row, value])
    pg.execute("TRUNCATE docs")
    pg.execute("INSERT INTO docs VALUES (100, '1')")
    for fmt in formats:
        result = run_cli("run", "docs", "--url", pg_dsn, "--slot", f"s_{fmt}", "--format", fmt,
                         "--until-idle", "0.5", timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [loads_document(line.encode()) for line in result.stdout.splitlines()]
        assert len(lines) == len(values) + 2, fmt
        rows = [_row(fmt, line) for line in lines[:len(values)]]
        assert [as_text(row["t"]) for row in rows] == [canonical(v) for v in values], fmt
        assert as_text(_row(fmt, lines[-1])) == '{"id":100,"t":1}', fmt


def test_messages_under_changefeeds_own_prefixes_cannot_stop_a_feed(pg, pg_dsn):
    # Any role may write a message with the prefixes the feed reads itself (watermarks,
    # back-fill requests): deep or odd content is ignored, the rows after it arrive.
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY)")
    feed = PostgresChangeFeed("docs", connection=pg_dsn, retry=FAST)
    assert list(feed.changes(timeout=0.5)) == []
    deep = "[" * 20_000 + "]" * 20_000
    for prefix, content in [
        ("changefeed.watermark", deep),
        ("changefeed.backfill", deep),
        ("changefeed.backfill", json.dumps({"slot": feed.slot, "tables": [[1], "x", {}, None]})),
        ("changefeed.watermark", json.dumps({"slot": feed.slot, "id": [[]], "mark": "high"})),
    ]:
        pg.execute("SELECT pg_logical_emit_message(true, %s, %s)", [prefix, content])
    pg.execute("INSERT INTO docs VALUES (1)")
    got = [change.new for change in feed.changes(limit=1, timeout=30)]
    feed.close()
    assert got == [{"id": 1}]


def test_deep_and_exact_json_through_the_sync_shape_api(pg, pg_dsn, server_max):
    # `changefeed serve TABLE` keeps rows in its shape log (jsonb) and serves PostgreSQL's text
    # of each value: a deep value stopped it (orjson's depth limits, exit 5), and json numbers
    # lost digits on their way through the log.
    from tests.serve.synctools import Server, get, shape_url

    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, j jsonb, t json)")
    values = {1: nested(1, "object"), 2: nested(255, "array"), 3: nested(1025, "object"),
              4: nested(server_max["array"] - 200, "array")}
    for row, value in values.items():
        pg.execute("INSERT INTO docs VALUES (%s, %s::jsonb, %s::json)", [row, value, value])
    # json (not jsonb, which the log is) can hold lone surrogates: kept as their text.
    for row, value in {7: '"\\ud800"', 8: '{"\\udc00": [1, "\\ud83d"]}'}.items():
        pg.execute("INSERT INTO docs VALUES (%s, '[]', %s::json)", [row, value])
    with Server(pg_dsn, ["docs"]).start() as server:
        value = nested(3000, "array").replace(EXACT, "-7.000000000000000000001")
        # After the snapshot, through the stream: an insert, updates of deep rows (their old
        # rows come from the log), a delete.
        pg.execute("INSERT INTO docs VALUES (6, %s::jsonb, %s::json)", [value, value])
        pg.execute("UPDATE docs SET j = %s::jsonb WHERE id IN (3, 4)", [value])
        pg.execute("UPDATE docs SET t = '[2.50]' WHERE id = 4")
        pg.execute("UPDATE docs SET j = '[1]' WHERE id = 7")  # its old row from the log
        pg.execute("INSERT INTO docs VALUES (9, '[]', '[\"\\udfff\"]')")
        pg.execute("DELETE FROM docs WHERE id = 2")
        # The log is jsonb: a json column comes out in jsonb's form (keys sorted), but for a
        # value jsonb cannot hold, which keeps its json text.
        expected = {row: (canonical(j), canonical(t)) for row, j, t in pg.execute(
            "SELECT id, j::text, CASE WHEN id IN (7, 8, 9) THEN t::text ELSE t::jsonb::text END"
            " FROM docs")}

        def shape_rows() -> dict:
            status, _, body = get(shape_url(server, table="docs", offset="-1"))
            assert status == 200, body
            return {int(m["value"]["id"]): (canonical(m["value"]["j"]), canonical(m["value"]["t"]))
                    for m in body if "value" in m}

        wait_until(lambda: shape_rows() == expected, "the shape's rows", 60,
                   said=lambda: server.errors()[-2000:], step=0.2)
        got = shape_rows()
        assert got == expected, server.errors()[-2000:]
        assert "error" not in server.errors()


def test_a_deep_publication_comment_cannot_stop_a_feed(pg, pg_dsn):
    # The feed keeps its state in its publication's comment, which the publication's owner may
    # set to anything: a deep one is not the feed's, and is not read (json.loads recursed).
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY)")
    assert run_cli("run", "docs", "--url", pg_dsn, "--until-idle", "0.5").returncode == 0
    (publication,) = pg.execute("SELECT pubname FROM pg_publication").fetchone()
    for comment in ("changefeed " + "[" * 50_000 + "]" * 50_000, "changefeed " + "{" * 3000):
        pg.execute(sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
            sql.Identifier(publication), sql.Literal(comment)))
        pg.execute("INSERT INTO docs SELECT coalesce(max(id), 0) + 1 FROM docs")
        result = run_cli("run", "docs", "--url", pg_dsn, "--format", "change",
                         "--until-idle", "0.5")
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(json_lines(result.stdout)) == 1
