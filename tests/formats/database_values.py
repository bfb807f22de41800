"""Database values of every kind the JSON codec knows, shared by the codec's and the deltas'
tests."""

from __future__ import annotations

from datetime import timedelta, timezone
from decimal import Decimal


def postgres_values() -> dict:
    """One row holding a value of each kind, PostgreSQL's own types included."""
    from ipaddress import IPv4Interface, IPv6Address

    from psycopg.types.multirange import Multirange
    from psycopg.types.range import Range

    from changefeed.backends.postgres.values import (
        Interval,
        JsonDecimal,
        JsonInt,
        NonFiniteFloat,
        PostgresText,
        RawJson,
        TimeTZ,
    )

    return {
        "id": 1, "nan": NonFiniteFloat("nan"), "inf": [NonFiniteFloat("inf"), 1.5],
        "ninf": NonFiniteFloat("-inf"), "date": PostgresText("infinity", "date"),
        "interval": Interval(14, -3, -500_000),
        "json": {"n": JsonDecimal("1.0000000000000000001"), "i": JsonInt(2**70), "s": "x"},
        "top": JsonInt(-(2**70)), "raw": RawJson('{"a":\n 1}', "json"),
        "timetz": TimeTZ(12, 30, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        "range": Range(1, 5, "[)"), "empty": Range(empty=True), "half": Range(None, 5, "()"),
        "multi": Multirange([Range(Decimal("1.5"), None, "[)")]),
        "inet": IPv4Interface("10.1.2.3/32"), "net": IPv4Interface("10.1.2.3/8"),
        "v6": IPv6Address("::1"), "composite": {"at": PostgresText("24:00:00", "time")},
    }
