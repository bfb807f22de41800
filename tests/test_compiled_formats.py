"""The compiled line encoders write what the pure-Python ones write, on random values.

`tests/backends/test_compiled_equivalence.py` compares them on what PostgreSQL streams; this
feeds them rows of generated Python values of every type a stage might put in a change (and
some no source makes: subclasses, keys that are not strings, integers beyond 64 bits, lone
surrogates), in every format: the bytes must be the same, or both must fail alike.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from datetime import time as clock_time
from decimal import Decimal
from typing import Any

import pytest

from changefeed import _speedups
from changefeed.backends.postgres.position import PgPosition
from changefeed.backends.postgres.values import (
    Interval,
    JsonDecimal,
    NonFiniteFloat,
    PostgresText,
    TimeTZ,
)
from changefeed.change import UNCHANGED, Change, Operation, SnapshotState
from changefeed.formats import debezium
from changefeed.formats.change_dict import change_line_encoder
from changefeed.formats.codec import dumps_line
from changefeed.formats.delta import delta_line_encoder
from changefeed.formats.registry import FormatOptions, format_named
from changefeed.message import Message

if _speedups.kernels is None:
    pytest.skip("the compiled extension is not built", allow_module_level=True)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Any] = [
        lambda: None, lambda: rng.random() < 0.5,
        lambda: rng.randint(-10, 10), lambda: rng.randint(-2**63, 2**64 - 1),
        lambda: rng.randint(2**64, 2**70) * rng.choice([1, -1]),
        lambda: rng.uniform(-1e300, 1e300), lambda: rng.choice([0.1, -0.0, 1e16, 1e-7]),
        lambda: NonFiniteFloat(rng.choice(["nan", "inf", "-inf"])),
        lambda: "".join(rng.choice('ab"\\\n\t\x00\x1f\x7fé€😀\u2028/') for _ in range(8)),
        # long runs of plain text with a character to escape anywhere (or none)
        lambda: "".join(rng.choice("plain text 0123456789" if rng.random() < 0.93 else
                                   '"\\\n\x01\x1fé😀') for _ in range(rng.randint(0, 40))),
        lambda: rng.choice(["\ud800", "x\udfffy"]),
        lambda: Decimal(rng.choice(["1.50", "-0.0000001", "NaN", "-Infinity", "1E+5", "0E-9"])),
        lambda: JsonDecimal("2.50"),
        lambda: datetime(rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28),
                         rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
                         rng.choice([0, 1, 500000, 999999]),
                         tzinfo=rng.choice([None, timezone.utc,
                                            timezone(timedelta(hours=2))])),
        lambda: date(rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28)),
        lambda: clock_time(rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
                           rng.choice([0, 7])),
        lambda: TimeTZ(12, 0, tzinfo=timezone(timedelta(hours=-3))),
        lambda: uuid.UUID(int=rng.getrandbits(128)),
        lambda: rng.randbytes(rng.randint(0, 7)), lambda: bytearray(b"\x01\x02"),
        lambda: PostgresText("infinity", "date"), lambda: Interval(1, 2, 3),
        lambda: UNCHANGED, lambda: {1, 2}, lambda: (1, "two"),
    ]
    if depth < 3:
        choices += [
            lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            lambda: {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))},
            lambda: {rng.choice([1, "s", None]): random_value(rng, depth + 1)},
        ]
    return rng.choice(choices)()


def random_change(rng: random.Random) -> Change:
    def row() -> dict[str, Any] | None:
        if rng.random() < 0.1:
            return None
        return {f"c{i}": random_value(rng) for i in range(rng.randint(0, 5))}

    operation = rng.choice([Operation.INSERT, Operation.UPDATE, Operation.DELETE])
    lsn = rng.choice([0, 1, 0x16B3748, 2**64 - 1])
    return Change(
        operation, rng.choice(["public.t", "app.Table \"x\"", "bare"]), row(), row(),
        rng.choice([None, {"id": rng.randint(0, 9)}, {"id": UNCHANGED}]),
        rng.choice([f"{lsn:016X}:{rng.randint(0, 9):08X}", PgPosition(lsn, rng.randint(0, 9)),
                    None, {"resume": "x"}, "opaque"]),
        rng.choice([None, datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)]),
        rng.choice([None, rng.randint(1, 2**32), "session:7"]), rng.random() < 0.2,
        rng.choice([None, {}, {"source_position": "p"}]), rng.choice([None, "abc123"]),
    )


def outcome(encode: Any, change: Change) -> Any:
    try:
        return encode(change)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_encoders_write_the_same_bytes(seed, monkeypatch):
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)
    kernels = _speedups.kernels
    rng = random.Random(seed)
    source = debezium.Source(database="db", name="server")
    pairs = [
        (delta_line_encoder.python_factory(), kernels.DeltaEncoder()),
        (delta_line_encoder.python_factory({"*": "M"}), kernels.DeltaEncoder({"*": "M"})),
        (change_line_encoder.python_factory(), kernels.ChangeEncoder()),
        (debezium.line_encoder.python_factory(source), kernels.DebeziumEncoder(source)),
    ]
    for _ in range(500):
        change = random_change(rng)
        for python, compiled in pairs:
            assert outcome(compiled, change) == outcome(python, change), change


def test_the_change_lines_of_other_items_are_their_dicts():
    """A feed yields more than changes (snapshot markers, messages, a subclass a stage made):
    the compiled `change` lines are theirs as the pure-Python encoder writes them."""

    class Tagged(Change):
        __slots__ = ()

    items = [
        SnapshotState("public.t", "started", PgPosition(0x16B3748, 0)),
        SnapshotState("public.t", "done", {"chunk": 3}),
        Message("app", b"{}", PgPosition(1, 2), True, None, 7, 0x16B3749),
        Tagged(Operation.INSERT, "public.t", new={"id": 1}),
    ]
    python, compiled = change_line_encoder.python_factory(), _speedups.kernels.ChangeEncoder()
    for item in items:
        assert compiled(item) == python(item) == dumps_line(item.to_dict())


def test_selection_gives_the_compiled_encoders():
    kernels = _speedups.kernels
    assert type(delta_line_encoder()) is kernels.DeltaEncoder
    assert type(debezium.line_encoder()) is kernels.DebeziumEncoder
    assert type(change_line_encoder()) is kernels.ChangeEncoder
    for name, compiled in [("delta", kernels.DeltaEncoder), ("change", kernels.ChangeEncoder),
                           ("debezium", kernels.DebeziumEncoder)]:  # what changefeed run takes
        assert type(format_named(name).lines(FormatOptions(url="dbname=x"))) is compiled


def random_json(rng: random.Random, depth: int = 0) -> str:
    """A JSON text as PostgreSQL may hold it: any spacing, escapes, exact numbers, repeated
    keys."""
    space = rng.choice(["", " ", "\n", "\t ", "\r\n"])
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice(["true", "false", "null"])
    if kind == 1:
        return str(rng.choice([0, -1, 7, 2**63, 2**64, -(2**63) - 1, 10**17, 10**19]))
    if kind == 2:
        return rng.choice(["1.0", "-0.5", "1e5", "2E-3", "1.0000000000000000001", "-0.0", "1e400"])
    if kind in (3, 4, 5):
        text = "".join(rng.choice('ab"\\/\n\té€😀\u2028\x7f') for _ in range(rng.randint(0, 6)))
        encoded = json.dumps(text, ensure_ascii=rng.random() < 0.5)
        return encoded.replace("\\u00e9", rng.choice(["\\u00e9", "\\u00E9", "é"]))
    if kind in (6, 7):
        items = [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return "[" + space + ("," + space).join(items) + space + "]"
    keys = [rng.choice(["a", "b", "é", "k\\n"]) for _ in range(rng.randint(0, 4))]
    pairs = [f'"{key}"{space}:{space}{random_json(rng, depth + 1)}' for key in keys]
    return "{" + space + ("," + space).join(pairs) + space + "}"


@pytest.mark.parametrize("seed", range(3))
def test_the_kernel_parses_json_as_json_loader_does(seed):
    from changefeed.backends.postgres.values import JsonLoader

    rng = random.Random(seed)
    loader = JsonLoader(3802)
    parsed = 0
    texts = [random_json(rng) for _ in range(2000)] + [
        '"\\ud83d\\ude00"', '"\\udc00"', "[NaN]", "01", "[1,]", '{"a":1}x', "\ufeff[]",
        "[" * 300 + "]" * 300, '"\x01"', "",
        # Nesting at and past MAX_DEPTH (200: deeper is kept as its text), -0 (keeps its sign).
        *("[" * n + "]" * n for n in (199, 200, 201)), '{"a":' * 201 + "1" + "}" * 201,
        "-0", '{"a":-0}', "[-0, 0, -0.0]", "-0e0",
    ]
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        got = _speedups.kernels.parse_json(data)
        if got is not None:
            parsed += 1
            assert same(got[0], loader.load(data)), text
    assert parsed > 1000


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, Decimal):
        return str(a) == str(b)
    return bool(a == b)
