"""JSON read exactly at any depth (`changefeed.formats.json_values`) and written back by the
codec at any depth: the pure functions, without a server (the real server's values are in
tests/test_values_guarantees.py)."""

from __future__ import annotations

import json
import pickle
import sys
from decimal import Decimal

import orjson
import pytest

from changefeed.formats.codec import FRAGMENT_DEPTH, dumps, dumps_line
from changefeed.formats.json_values import (
    MAX_DEPTH,
    JsonDecimal,
    JsonInt,
    RawJson,
    deeper_than,
    loads_document,
    loads_text,
    loads_value,
    lone_surrogate,
)


def nested(depth: int, inner: str = "", opener: str = "[") -> str:
    """``depth`` containers around ``inner``: arrays, or objects with the key ``"a"``."""
    if opener == "[":
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + (inner or "1") + "}" * depth


def python_depth(value) -> int:
    depth = 0
    while isinstance(value, (list, dict)) and value:
        value = value[0] if isinstance(value, list) else next(iter(value.values()))
        depth += 1
    return depth + (isinstance(value, (list, dict)))


@pytest.mark.parametrize("opener", ["[", "{"])
@pytest.mark.parametrize("depth", [1, 199, 200, 201, 254, 255, 256, 1000, 5000, 14554, 30000])
def test_a_value_is_python_up_to_max_depth_and_its_exact_text_beyond(depth, opener):
    text = nested(depth, opener=opener)
    value = loads_value(text.encode(), "jsonb", trusted=True)
    if depth <= MAX_DEPTH:
        assert not isinstance(value, RawJson) and python_depth(value) == depth
        assert dumps(value) == text.encode()
    else:
        assert isinstance(value, RawJson) and value == text and value.type == "jsonb"
        assert dumps({"j": value}) == ('{"j":' + text + "}").encode()
    assert deeper_than(text.encode()) is (depth > MAX_DEPTH)


def test_depth_counts_containers_not_brackets_in_strings_or_siblings():
    wide = "[" + ",".join(["[[1]]"] * 1000) + "]"  # 3 deep, 3000 brackets
    assert not deeper_than(wide.encode())
    assert not isinstance(loads_value(wide.encode()), RawJson)
    in_strings = json.dumps(["[" * 1000, "{" * 1000])
    assert loads_value(in_strings.encode()) == ["[" * 1000, "{" * 1000]
    mixed = nested(150, nested(60, opener="{"))  # 210 deep, both kinds
    assert deeper_than(mixed.encode()) and not deeper_than(mixed.encode(), 210)


def test_reading_never_recurses_with_the_depth():
    # Called with the stack nearly full (room for MAX_DEPTH levels and a margin): a parse
    # that recursed with the depth of the text would raise RecursionError.
    text = nested(20000, '{"k": [1.5]}').encode()

    def deep_call(levels: int):
        if levels:
            return deep_call(levels - 1)
        return loads_value(text), loads_document(b'{"new":{"j":' + text + b"}}")

    value, document = deep_call(sys.getrecursionlimit() - MAX_DEPTH - 150)
    assert isinstance(value, RawJson) and isinstance(document, dict)


@pytest.mark.parametrize("text", [
    nested(300)[:-1],                      # a container that does not close
    nested(300) + "]",                      # one that never opened
    nested(300, "01"),                      # a bad number deep inside
    nested(300, '"a\x01"'),                 # a raw control character deep inside
    nested(300, "NaN"),                     # not JSON, though json.loads takes it
    nested(300) + " x",                     # text after it
    "NaN", "Infinity", "[1, -Infinity]", "{'a': 1}", "",
])
def test_text_that_is_not_json_is_refused_at_any_depth(text):
    with pytest.raises(ValueError):
        loads_value(text.encode())


@pytest.mark.parametrize(("text", "value", "out"), [
    ("1.00000000000000000001", JsonDecimal("1.00000000000000000001"), b"1.00000000000000000001"),
    ("12345678901234567890123", JsonInt(12345678901234567890123), b"12345678901234567890123"),
    ("-18446744073709551617", JsonInt(-18446744073709551617), b"-18446744073709551617"),
    ("18446744073709551615", 18446744073709551615, b"18446744073709551615"),
    ("1e400", JsonDecimal("1e400"), b"1E+400"),
    ("-1.5E-300", JsonDecimal("-1.5E-300"), b"-1.5E-300"),
    ("0.1", JsonDecimal("0.1"), b"0.1"),
    ("1.10", JsonDecimal("1.10"), b"1.10"),
    ("-0", JsonDecimal("-0"), b"-0"),
    ("-0.0", JsonDecimal("-0.0"), b"-0.0"),
    ("9" * 5000, JsonDecimal("9" * 5000), b"9" * 5000),
    ('{"a": [1, {"b": 1.00000000000000000001}]}',
     {"a": [1, {"b": JsonDecimal("1.00000000000000000001")}]},
     b'{"a":[1,{"b":1.00000000000000000001}]}'),
])
def test_numbers_keep_their_digits(text, value, out):
    got = loads_value(text.encode())
    assert got == value and type(got) is type(value)
    assert dumps(got) == out


@pytest.mark.parametrize(("text", "raw"), [
    ('"\\ud800"', True),                     # a lone high surrogate
    ('"\\udc00"', True),                     # a lone low one
    ('"\\ud800\\u0041"', True),              # a high one followed by something else
    ('"\\udc00\\ud800"', True),              # the wrong order
    ('{"\\ud800": 1}', True),                # in a key
    ('["\\ud83d\\ude00", "\\uD83D\\uDE00"]', False),  # pairs: one character each
    ('"\\\\ud800"', False),                  # an escaped backslash, then text
    ('"\\\\\\ud800"', True),                 # an escaped backslash, then a lone surrogate
    ('"\\u00e9\\u0000"', False),
])
def test_escaped_lone_surrogates_keep_the_exact_text(text, raw):
    assert lone_surrogate(text.encode()) is raw
    value = loads_value(text.encode(), "json", trusted=True)
    assert isinstance(value, RawJson) is raw
    dumps(value)  # always encodable
    if raw:
        assert dumps([value]) == b"[" + text.encode() + b"]"


def test_raw_json_pickles_and_stays_one_line():
    raw = RawJson('[1,\n 2,\r\n 3]', "jsonb")
    again = pickle.loads(pickle.dumps(raw))
    assert again == raw and again.type == "jsonb" and isinstance(again, RawJson)
    assert dumps_line({"v": raw}) == b'{"v":[1,  2,   3]}\n'


# -- documents read back -------------------------------------------------------------------


def test_a_document_written_by_orjson_reads_back_as_orjson_reads_it():
    record = {"operation": "update", "new": {"id": 1, "f": 0.1, "g": 1e-07, "n": None,
                                            "s": "é\n", "b": True, "big": 2**64 - 1},
              "position": "00000000016B3748:00000002"}
    data = orjson.dumps(record)
    got = loads_document(data)
    assert got == record and type(got["new"]["f"]) is float
    assert orjson.dumps(got) == data


def test_a_document_keeps_numbers_orjson_would_change():
    data = (b'{"new":{"a":1.00000000000000000001,"b":12345678901234567890123,"c":1.10,'
            b'"d":1' + b"0" * 400 + b',"e":0.25,"f":-0}}')
    got = loads_document(data)["new"]
    assert got["a"] == Decimal("1.00000000000000000001") and isinstance(got["a"], JsonDecimal)
    assert got["b"] == 12345678901234567890123 and isinstance(got["b"], JsonInt)
    assert str(got["c"]) == "1.10"
    assert got["d"] == 10**400
    assert got["e"] == 0.25 and type(got["e"]) is float  # a float that loses nothing
    assert str(got["f"]) == "-0"
    assert dumps(loads_document(data)) == data


@pytest.mark.parametrize("depth", [198, 199, 254, 255, 1000, 1025, 20000])
def test_a_document_keeps_its_parts_below_max_depth_as_text(depth):
    value = nested(depth, '{"x": [1.5, "\\ud83d\\ude00"]}')
    data = ('{"new":{"j":' + value + '},"position":"p"}').encode()
    got = loads_document(data)
    assert got["position"] == "p"
    # Written back, it is the same JSON, whatever was kept as text.
    assert dumps(got) == data
    if depth + 3 > MAX_DEPTH:
        inner = got["new"]["j"]
        for _ in range(MAX_DEPTH - 2):
            inner = inner[0]
        assert isinstance(inner, RawJson)


def test_a_document_with_lone_surrogates_keeps_those_strings_and_objects_as_text():
    data = b'{"new":{"s":"\\ud800","k":{"\\udc00":[1,2]},"ok":"\\ud83d\\ude00"}}'
    got = loads_document(data)
    assert got["new"]["s"] == RawJson('"\\ud800"') and got["new"]["ok"] == "\U0001f600"
    assert got["new"]["k"] == RawJson('{"\\udc00":[1,2]}')
    assert dumps(got) == data.replace(b"\\ud83d\\ude00", "\U0001f600".encode())


@pytest.mark.parametrize("depth", [1, 199, 255, 1025, 20000])
def test_postgresqls_jsonb_text_reads_exactly_at_any_depth(depth):
    # jsonb's text has spaces after ':' and ',': no orjson shortcut, the same values.
    data = ('{"n": 1.00000000000000000001, "b": 12345678901234567890123, "f": 0.25, "j": '
            + nested(depth, "[1.5, -0]") + "}").encode()
    got = loads_text(data)
    assert type(got["n"]) is JsonDecimal and type(got["b"]) is JsonInt
    assert type(got["f"]) is float
    assert dumps(got).replace(b" ", b"") == data.replace(b" ", b"")  # parts as text keep theirs
    inner = got["j"]
    for _ in range(min(depth, MAX_DEPTH - 1)):
        if isinstance(inner, RawJson):
            break
        inner = inner[0]
    assert isinstance(inner, RawJson) == (depth + 2 > MAX_DEPTH)
    with pytest.raises(ValueError):
        loads_text(data[:-1])


@pytest.mark.parametrize("data", [b"", b"{", b'{"a":1}}', nested(400)[:-1].encode(), b"NaN",
                                  b'{"a":' + nested(400, "01").encode() + b"}"])
def test_a_document_that_is_not_json_is_refused(data):
    with pytest.raises(ValueError):
        loads_document(data)


# -- writing at any depth ------------------------------------------------------------------


@pytest.mark.parametrize("depth", [FRAGMENT_DEPTH, 254, 255, 256, 3000])
def test_the_codec_encodes_python_values_of_any_depth(depth):
    value: object = {"n": Decimal("1.5")}
    text = '{"n":"1.5"}'
    for level in range(depth):
        if level % 2:
            value, text = [value, level], f"[{text},{level}]"
        else:
            value, text = {"x": value}, f'{{"x":{text}}}'
    assert dumps({"k": value}).decode() == '{"k":' + text + "}"
    assert dumps_line({1: value}).decode() == '{"1":' + text + "}\n"


def test_long_raw_texts_deep_in_lists_are_written_exactly():
    # orjson 3.13 writes past its buffer after a Fragment of a few kB followed by enough
    # ",1]": the codec puts long raw texts in place itself (checked clean under valgrind).
    for size in range(1500, 4300, 97):
        for leaf, text in ((RawJson("[" * 201 + "1," * (size // 2) + "1" + "]" * 201),
                            "[" * 201 + "1," * (size // 2) + "1" + "]" * 201),
                           (JsonDecimal("1" * size), "1" * size)):
            value: object = leaf
            for _ in range(40):
                value, text = [value, 1], f"[{text},1]"
            assert dumps(value) == text.encode()
            assert dumps_line({"j": value}) == b'{"j":' + text.encode() + b"}\n"


# -- message content -----------------------------------------------------------------------


@pytest.mark.parametrize(("content", "line"), [
    (b'{"a": 1.00000000000000000001, "b": 12345678901234567890123}',
     b'{"a":1.00000000000000000001,"b":12345678901234567890123}'),
    (b"[-0, -0.0, 1e-7, 0.1]", b"[-0,-0.0,1E-7,0.1]"),
    (nested(300).encode(), nested(300).encode()),
    (nested(5000, '{"x": 1.10}', "{").encode(), nested(5000, '{"x": 1.10}', "{").encode()),
    (b'"\\ud800"', b'"\\ud800"'),
    (nested(300, "").encode()[:-1], b'"' + nested(300, "").encode()[:-1] + b'"'),  # text
    (b"NaN", b'"NaN"'),  # text: not JSON
])
def test_message_content_keeps_its_digits_and_depth(content, line):
    from changefeed.message import Message

    message = Message("p", content, "0000000000000001:00000000")
    assert dumps(message.to_dict()["content"]) == line
    if line.startswith(b'"') and not content.startswith(b'"'):
        with pytest.raises(ValueError):
            message.json()
    else:
        assert dumps(message.json()) == line
