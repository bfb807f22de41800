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


# Input depth: no expression, however deep, may reach Python's recursion limit.


@pytest.mark.parametrize(
    "text",
    [
        "(" * 5000 + "a == 1" + ")" * 5000,
        "not " * 5000 + "a == 1",
        "(not " * 3000 + "a == 1" + ")" * 3000,
        "(" * 101 + "a == 1" + ")" * 101,
        "not " * 101 + "a == 1",
        "(" * 200000,  # unbalanced too: the depth is the first problem met
    ],
)
def test_where_deeper_than_the_limit_is_a_configuration_error(text):
    with pytest.raises(ConfigurationError, match="nested more than 100 levels deep"):
        parse_where(text)


@pytest.mark.parametrize("depth", [1, 50, 100])
def test_where_up_to_the_limit_reads(depth):
    nested = parse_where("(" * depth + "a == 1" + ")" * depth)
    assert nested == ["==", "a", 1]
    negated = parse_where("not " * depth + "a == 1")
    for _ in range(depth):
        assert negated[0] == "not"
        negated = negated[1]
    assert negated == ["==", "a", 1]


def nested_filter(depth: int, op: str = "and") -> list:
    filter: list = ["==", "a", 1]
    for _ in range(depth - 1):
        filter = [op, filter] if op != "not" else ["not", filter]
    return filter


@pytest.mark.parametrize("op", ["and", "or", "not"])
def test_filters_deeper_than_the_limit_are_refused_when_compiled(op):
    # 99 'not's around a match do not match; 99 one-part 'and's or 'or's do
    assert compile_filter(nested_filter(100, op))({"a": 1}) is (op != "not")
    with pytest.raises(ConfigurationError, match="at most 100 levels"):
        compile_filter(nested_filter(101, op))
    with pytest.raises(ConfigurationError, match="at most 100 levels"):
        compile_filter(nested_filter(20000, op))


@pytest.mark.parametrize("depth", [101, 5000, 100000])
def test_filter_json_of_any_depth_is_a_configuration_error(depth):
    from changefeed.pipelines.where_expressions import parse_filter

    text = '["and", ' * depth + '["==", "a", 1]' + "]" * depth
    with pytest.raises(ConfigurationError, match="100 levels"):
        parse_filter(text)
