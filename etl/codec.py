"""JSON decoding of the API's results lines: orjson's speed, the standard library's leniency.

orjson parses a results line in about a third of the time `json.loads` takes (0.5 s against 1.5 s for
100,000 lines, bench/RESULTS.md), but refuses some input the standard library reads: escaped lone
surrogates (`"\\ud800"`), `NaN` and `Infinity`, numbers too large for a double. Such a line must not become
unreadable, so whatever orjson refuses is read again by `json.loads`, and reads exactly as it always did
(or fails with the same `ValueError`).

Not for user data: orjson turns an integer wider than 64 bits into a float. The API's own numbers (token
counts) are small, and the model's text is a string inside the line; a model's JSON *output* is parsed
with `json.loads` (settlement).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
