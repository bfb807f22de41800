"""The compiled line encoders write what the pure-Python ones write, on random values.

`tests/backends/test_compiled_equivalence.py` compares them on what PostgreSQL streams; this
feeds them rows of generated Python values of every type a stage might put in a change (and
some no source makes: subclasses, keys that are not strings, integers beyond 64 bits, lone
surrogates), in every format: the bytes must be the same, or both must fail alike.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from datetime import time as clock_time
from decimal import Decimal
from typing import Any

import pytest

from changefeed import _speedups
from changefeed.backends.postgres.values import (
    Interval,
    JsonDecimal,
    NonFiniteFloat,
    PostgresText,
    TimeTZ,
)
from changefeed.change import UNCHANGED, Change, Operation
from changefeed.pipelines import debezium
from changefeed.pipelines.delta import delta_line_encoder, dumps_line

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
        rng.choice([f"{lsn:016X}:{rng.randint(0, 9):08X}", None, {"resume": "x"}, "opaque"]),
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
        (lambda change: dumps_line(change.to_dict()), kernels.ChangeEncoder()),
        (debezium.line_encoder.python_factory(source), kernels.DebeziumEncoder(source)),
    ]
    for _ in range(500):
        change = random_change(rng)
        for python, compiled in pairs:
            assert outcome(compiled, change) == outcome(python, change), change


def test_selection_gives_the_compiled_encoders():
    assert type(delta_line_encoder()) is _speedups.kernels.DeltaEncoder
    assert type(debezium.line_encoder()) is _speedups.kernels.DebeziumEncoder
    assert type(_speedups.change_line_encoder()) is _speedups.kernels.ChangeEncoder
