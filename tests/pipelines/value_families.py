"""A row holding a value of every family of the README's Values table (as the PostgreSQL backend
loads them), for tests of what must carry values exactly."""

from __future__ import annotations

import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any

from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from changefeed.backends.postgres.values import Interval, NonFiniteFloat, PostgresText, TimeTZ
from changefeed.change import UNCHANGED
from changefeed.formats.json_values import JsonDecimal, JsonInt, RawJson


def every_value_family() -> dict[str, Any]:
    """Column name -> a value of one family; every family of the Values table once at least."""
    return {
        "int": 7, "big": -(2**63), "numeric": Decimal("1.50"), "nan": Decimal("NaN"),
        "minus_inf": Decimal("-Infinity"), "float": 2.5, "float_nan": NonFiniteFloat("nan"),
        "float_inf": NonFiniteFloat("-inf"), "bool": True, "text": "tâche \u00e9\U0001f600",
        "empty": "", "bytea": b"\x00\xff", "uuid": uuid.UUID(int=12345),
        "date": date(2024, 2, 29), "timestamp": datetime(2024, 1, 2, 3, 4, 5, 500000),
        "timestamptz": datetime(2024, 1, 2, 1, 4, 5, tzinfo=timezone.utc),
        "time": time(23, 59, 59, 999999),
        "timetz": TimeTZ(12, 0, tzinfo=timezone(timedelta(hours=2))),
        "infinity": PostgresText("infinity", "timestamptz"),
        "bc": PostgresText("4713-01-01 BC", "date"),
        "interval": Interval(14, 3, 14706789000),
        "json": {"a": [1, None, {"b": JsonDecimal("1.0000000000000000001")}],
                 "big": JsonInt(2**70), "s": "x"},
        "json_list": [True, False, None, "s", JsonDecimal("-0")],
        "raw_json": RawJson('"\\ud800"', "json"),
        "array": [[1, None], [3, 4]], "enum": "open", "composite": {"x": 1, "y": "z"},
        "range": Range(1, 5, "[)"), "empty_range": Range(empty=True),
        "multirange": Multirange([Range(1, 2), Range(4, None)]),
        "inet": ip_address("192.168.0.1"), "inet_prefix": ip_interface("::ffff:1.2.3.4/64"),
        "cidr": ip_network("10.0.0.0/8"), "money": Decimal("1234567.89"), "null": None,
        "toasted": UNCHANGED,
    }
