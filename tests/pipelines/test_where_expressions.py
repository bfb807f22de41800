"""``--where`` expressions: the Snorky filter each one reads as, and where a bad one fails."""

from __future__ import annotations

import pytest

from changefeed import ConfigurationError
from changefeed.pipelines import compile_filter
from changefeed.pipelines.where_expressions import parse_where


@pytest.mark.parametrize(
    "text, expected",
    [
        ('status == "open"', ["==", "status", "open"]),
        ("status == 'open'", ["==", "status", "open"]),
        ("n >= 2 and n < 5", ["and", [">=", "n", 2], ["<", "n", 5]]),
        ("a == 1 or b == 2 and c == 3",
         ["or", ["==", "a", 1], ["and", ["==", "b", 2], ["==", "c", 3]]]),
        ("(a == 1 or b == 2) and c == 3",
         ["and", ["or", ["==", "a", 1], ["==", "b", 2]], ["==", "c", 3]]),
        ("not done == true", ["not", ["==", "done", True]]),
        ("owner.name != null", ["not", ["==", "owner.name", None]]),
        ("price <= -2.5e1", ["<=", "price", -25.0]),
        ('title == "say \\"hi\\""', ["==", "title", 'say "hi"']),
    ],
)
def test_parse_where(text, expected):
    assert parse_where(text) == expected
    compile_filter(expected)  # always a valid Snorky filter


@pytest.mark.parametrize(
    "text, column",
    [("status = 'open'", 8), ("== 1", 1), ("a == ", 5), ("a == b", 6), ("(a == 1", 8),
     ("a == 1 b == 2", 8), ("a == 'x", 6)],
)
def test_parse_where_points_at_the_problem(text, column):
    with pytest.raises(ConfigurationError, match=f"column {column}"):
        parse_where(text)
