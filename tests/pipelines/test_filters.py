"""Snorky filters: which fields a filter reads, and the exact message of each malformed one."""

import pytest

from changefeed import ConfigurationError
from changefeed.pipelines.filters import compile_filter, filter_fields


@pytest.mark.parametrize("filter, fields", [
    (["==", "color", "blue"], {"color"}),
    (["and", ["==", "service", "web"], [">=", "level", 3]], {"service", "level"}),
    (["or", ["not", ["==", "a", 1]], ["and", ["<", "b.c", 2], ["==", "d", 3]]],
     {"a", "b.c", "d"}),
    (["and", ["==", "a", 1], ["==", "a", 2], ["==", "e", 3]], {"a", "e"}),
])
def test_filter_fields_are_every_field_the_filter_reads(filter, fields):
    # A subscription needs the old values of exactly these fields (REPLICA IDENTITY FULL).
    assert filter_fields(filter) == fields


@pytest.mark.parametrize("bad, message", [
    ([], "a filter is a non-empty list such as ['==', 'color', 'blue'], not []"),
    (["==", "color"],
     "'==' takes a field name and a value, as in ['==', 'age', 21]: got ['==', 'color']"),
    (["and"], "'and' needs at least one filter: got ['and']"),
    (["not", ["==", "a", 1], ["==", "b", 2]],
     "'not' takes exactly one filter: got ['not', ['==', 'a', 1], ['==', 'b', 2]]"),
    (["~=", "color", "blue"],
     "unknown filter operator '~=': use one of ==, <, <=, >, >=, and, or, not"),
])
def test_a_malformed_filter_says_what_is_wrong(bad, message):
    with pytest.raises(ConfigurationError) as info:
        compile_filter(bad)
    assert info.value.message == message
