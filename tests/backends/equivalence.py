"""What the equivalence tests of the stream's decoders (test_compiled_equivalence) and of the
COPY parsers (test_copy_equivalence) share: random rows of scalar values, and `same`, the
comparison of what two paths made."""

from __future__ import annotations

import json
import math
import random
import uuid
from datetime import date, datetime
from datetime import time as clock_time
from decimal import Decimal
from typing import Any

from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from changefeed.backends.postgres.values import PostgresText
from changefeed.change import Change
from changefeed.message import Message


def random_rows(seed: int, count: int) -> list[tuple[str, list[Any]]]:
    """Rows of random values for the equivalence tests' `scalars` table (as statements with
    parameters): lengths, signs, precisions, NULLs, text full of what COPY and JSON escape,
    dates and times across the ranges Python holds and beyond."""
    rng = random.Random(seed)

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.15 else value

    def text() -> str:
        alphabet = 'ab "\\\n\t\r\x01\x08\x0b\x0cé€😀\u2028/N'
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))

    def numeric() -> str:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30)))
        point = rng.randint(0, len(digits))
        number = (digits[:point] or "0") + ("." + digits[point:] if point < len(digits) else "")
        return rng.choice(["", "-"]) + number

    def when() -> str:
        year = rng.choice([1, 99, 1969, 2024, 9999, 10000, -44])
        era = " BC" if year < 0 else ""
        fraction = rng.choice(["", ".5", ".123456", ".000001"])
        return (f"{abs(year):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                f" {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
                f"{fraction}{era}")

    rows = []
    for _ in range(count):
        stamp = when()
        rows.append((
            "INSERT INTO scalars (i2, i4, i8, n, f4, f8, flag, t, c, bin, u, d, ts, tz, tm, jb)"
            " VALUES (%s, %s, %s, %s::numeric, %s::float4, %s::float8, %s, %s, %s, %s, %s,"
            " %s::date, %s::timestamp, %s::timestamptz, %s::time, %s::jsonb)",
            [maybe(rng.randint(-32768, 32767)), maybe(rng.randint(-2**31, 2**31 - 1)),
             maybe(rng.choice([rng.randint(-2**63, 2**63 - 1), rng.randint(-999, 999)])),
             maybe(rng.choice([numeric(), "NaN"])), maybe(repr(rng.uniform(-1e6, 1e6))),
             maybe(rng.choice([repr(rng.uniform(-1e300, 1e300)), repr(rng.random()),
                               "Infinity", "-0"])),
             maybe(rng.random() < 0.5), maybe(text()), maybe(text()[:5]),
             maybe(rng.randbytes(rng.randint(0, 20))), maybe(uuid.UUID(int=rng.getrandbits(128))),
             maybe(stamp.split(" ")[0] + (" BC" if stamp.endswith("BC") else "")),
             maybe(stamp), maybe(stamp + "+00"),
             maybe(rng.choice([stamp.split(" ")[1], "24:00:00"])),
             maybe(rng.choice(['{"x": 1}', f"[{json.dumps(text())}, {Decimal(numeric())}]",
                               f'[{Decimal(numeric())}, "{rng.random()}"]', "null"]))],
        ))
    return rows


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types, recursively, to the last detail a consumer could see."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b) and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, PostgresText):
        return str(a) == str(b) and a.type == b.type
    if isinstance(a, (datetime, clock_time)):
        return a == b and repr(a) == repr(b)
    if isinstance(a, date):
        return a == b
    if isinstance(a, uuid.UUID):
        return a == b and a.is_safe == b.is_safe
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, Multirange)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, Range):
        return a.isempty == b.isempty and a.bounds == b.bounds and same(a.lower, b.lower) \
            and same(a.upper, b.upper)
    if isinstance(a, Change):
        return all(same(getattr(a, field), getattr(b, field)) for field in Change.__slots__)
    if isinstance(a, Message):
        return all(same(getattr(a, field), getattr(b, field)) for field in Message.__slots__)
    return bool(a == b)
