"""`codec.loads` reads everything `json.loads` reads, the same way, only faster on ordinary input."""

from __future__ import annotations

import json
import math

import orjson
import pytest

from etl import codec


@pytest.mark.parametrize(
    "text",
    [
        '{"custom_id":"q1","result":{"type":"succeeded","message":{"content":[{"type":"text","text":"hi"}]}}}',
        '{"text":"caf\\u00e9 \\ud83d\\ude00 \\n\\t\\"quoted\\""}',
        "[1, 2.5, -3e-7, true, false, null]",
    ],
)
def test_ordinary_json_is_read_by_orjson_as_json_would_read_it(text: str) -> None:
    orjson.loads(text)  # the fast path takes it
    assert codec.loads(text.encode()) == codec.loads(text) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"text":"half an emoji \\ud83d"}',  # an escaped lone surrogate
        '{"n":1e400}',  # beyond a double
        '{"x":NaN,"y":Infinity}',
    ],
)
def test_what_orjson_refuses_is_read_as_json_reads_it(text: str) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)
    got, want = codec.loads(text.encode()), json.loads(text)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key])
        else:
            assert got[key] == value


@pytest.mark.parametrize("data", [b'{"custom_id": "q1", "resu', b"\xff\xfe not json", b""])
def test_unreadable_input_still_fails_with_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        codec.loads(data)
