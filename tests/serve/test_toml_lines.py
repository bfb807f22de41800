"""`key_lines`: the line of every key of a TOML document, checked against tomllib's own parse."""

from __future__ import annotations

from typing import Any

import pytest

from changefeed.serve.pipelines.toml_lines import key_lines, keys_on_line, tomllib

DOCUMENTS = {
    "the issue's example": '''
[pipelines.orders]            # the pipeline's name
url = "${DATABASE_URL}"
tables = ["orders", "order_lines"]
ops = ["insert", "update"]
sink = "/var/lib/changefeed/orders.jsonl"   # any --sink spec
''',
    "strings that look like keys and headers": '''
[pipelines.a]
where = "x = 1 # not a comment"
note = """
[pipelines.fake]
url = "inside a multi-line string"
"""
path = 'C:\\dir\\[x]'
raw = \'\'\'
tables = ["nope"]
\'\'\'
escaped = "a \\" quote = and # more"
tricky = """ends with a quote"\"""
after = 1
''',
    "arrays over several lines, with comments": '''
[pipelines.b]
tables = [
  "one",  # first
  # a comment line ] with a bracket
  "two", "three",
  [ "nested", 1 ],
]
after = true
''',
    "dotted, quoted keys and inline tables": '''
defaults.url = "x"
[pipelines."with.dot"]
model = { orders = "Order", "order lines" = "Line" }
sub.key = 1
"quoted key" = 2
[pipelines.'literal']
empty = {}
''',
    "arrays of tables, CRLF line ends": (
        "[[items]]\r\nname = 'a'\r\n\r\n[[items]]\r\nname = 'b'\r\nsub = { x = 1 }\r\n"),
    "numbers, dates, booleans": '''
a = 1_000
b = -0.5e3
c = 1979-05-27T07:32:00Z
d = inf
e = false
f = 0x1F
''',
}


def paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path and array item of tomllib's result."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            found.append((*prefix, key))
            found.extend(paths(value, (*prefix, key)))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found.append((*prefix, index))
            found.extend(paths(value, (*prefix, index)))
    return found


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_key_and_item_tomllib_sees_has_the_line_it_is_on(name):
    text = DOCUMENTS[name]
    lines = key_lines(text)
    expected = paths(tomllib.loads(text))
    assert set(expected) <= set(lines), set(expected) - set(lines)
    source = text.replace("\r\n", "\n").split("\n")
    for path in expected:
        line = source[lines[path] - 1]
        last = path[-1]
        if isinstance(last, str):
            assert last in line or repr(last)[1:-1] in line or "[[" in line, (path, line)


def test_lines_of_the_issue_example():
    lines = key_lines(DOCUMENTS["the issue's example"])
    assert lines[("pipelines", "orders")] == 2
    assert lines[("pipelines", "orders", "url")] == 3
    assert lines[("pipelines", "orders", "tables", 1)] == 4
    assert lines[("pipelines", "orders", "sink")] == 6


def test_lines_of_items_on_their_own_lines():
    lines = key_lines(DOCUMENTS["arrays over several lines, with comments"])
    assert [lines[("pipelines", "b", "tables", i)] for i in range(4)] == [4, 6, 6, 7]
    assert lines[("pipelines", "b", "after")] == 9


def test_nothing_inside_strings_is_taken_for_a_key():
    lines = key_lines(DOCUMENTS["strings that look like keys and headers"])
    assert ("pipelines", "fake") not in lines
    assert not any("tables" in path for path in lines)
    assert lines[("pipelines", "a", "after")] == 14


def test_text_that_toml_rejects_gives_what_came_before_the_problem():
    text = '[pipelines.a]\nurl = "x"\nsink = "unterminated\nlater = 1\n'
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(text)
    lines = key_lines(text)
    assert lines[("pipelines", "a", "url")] == 2
    assert lines[("pipelines", "a", "sink")] == 3
    assert ("pipelines", "a", "later") not in lines


def test_keys_on_a_line_longest_first():
    text = '[pipelines.a]\nmodel = { orders = "O" }\n'
    assert keys_on_line(text, 2) == [("pipelines", "a", "model", "orders"),
                                     ("pipelines", "a", "model")]
