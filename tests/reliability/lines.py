"""Generated results lines (issue 21): what the Batches API promises, and everything it could send instead.

`RESULT_LINES` are lines for one request (its custom_id filled in by the emulator's `raw` outcome at
`{custom_id}`): any JSON value where the API promises an object, any text including lone surrogates and
NUL, huge texts, missing and null fields, extra fields. `JUNK_LINES` name no request at all: not JSON,
not an object, no custom_id string, a custom_id of someone else's form.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

PLACEHOLDER = "{custom_id}"
MISSING = object()

# Any character, lone surrogates (category Cs) and NUL included.
TEXTS = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
HUGE_TEXTS = st.sampled_from([300_000, 2_000_000]).map(lambda n: "é" * n)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3),
    max_leaves=6,
)


def good_message(text: str = "a fine answer") -> dict[str, Any]:
    return {
        "id": "msg_generated",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 5},
    }


def line(result: Any) -> str:
    """A results line for the request, holding `result` as given."""
    return json.dumps({"custom_id": PLACEHOLDER, "result": result})


def good_line(text: str = "a fine answer") -> str:
    return line({"type": "succeeded", "message": good_message(text)})


def _maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The promised value, any JSON value instead, or the field missing altogether."""
    return st.one_of(good, good, ANY_JSON, st.just(MISSING))


def _object(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(values: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, **{k: v for k, v in values.items() if v is not MISSING}}

    return st.builds(build, st.fixed_dictionaries(fields), st.dictionaries(TEXTS, ANY_JSON, max_size=2))


BLOCKS = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXTS | HUGE_TEXTS | ANY_JSON),
    st.sampled_from(
        [
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "redacted_thinking", "data": "xx"},
        ]
    ),
    ANY_JSON,
)
USAGE = _object(
    {
        "input_tokens": _maybe(st.integers(0, 10**6)),
        "output_tokens": _maybe(st.integers(0, 10**6)),
        "cache_creation_input_tokens": _maybe(st.none() | st.integers(0, 1000)),
        "cache_read_input_tokens": _maybe(st.none() | st.integers(0, 1000)),
    }
)
MESSAGE = _object(
    {
        "type": _maybe(st.just("message")),
        "role": _maybe(st.just("assistant")),
        "model": _maybe(st.sampled_from(["claude-haiku-4-5", "claude-sonnet-4-5"]) | TEXTS),
        "content": _maybe(st.lists(BLOCKS, max_size=3)),
        "stop_reason": _maybe(st.sampled_from(["end_turn", "max_tokens", "tool_use", None])),
        "usage": _maybe(USAGE),
    }
)
# Error types the API documents, minus those that pause submission (a test of its own elsewhere).
ERROR_TYPES = st.sampled_from(["invalid_request_error", "api_error", "overloaded_error", "not_found_error"])
ERROR = _object(
    {
        "type": _maybe(st.just("error")),
        "error": _maybe(_object({"type": _maybe(ERROR_TYPES), "message": _maybe(TEXTS)})),
    }
)
RESULT = st.one_of(
    _object({"type": st.just("succeeded"), "message": _maybe(MESSAGE)}),
    _object({"type": st.just("succeeded"), "message": _maybe(MESSAGE)}),
    _object({"type": st.just("errored"), "error": _maybe(ERROR)}),
    _object({"type": st.just("expired")}),  # (canceled goes back to the queue unbilled: tested elsewhere)
    _object({"type": ANY_JSON}),
    ANY_JSON,
)
RESULT_LINES = st.builds(
    lambda result, extra: json.dumps(
        {**extra, "custom_id": PLACEHOLDER, **({} if result is MISSING else {"result": result})}
    ),
    st.one_of(RESULT, st.just(MISSING)),
    st.dictionaries(TEXTS.filter(lambda k: k not in ("custom_id", "result")), ANY_JSON, max_size=2),
)
JUNK_LINES = st.one_of(
    TEXTS.map(lambda t: t.replace("\n", " ").replace("\r", " ")),  # mostly not JSON
    ANY_JSON.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.dictionaries(TEXTS.filter(lambda k: k != "custom_id"), ANY_JSON, max_size=3).map(json.dumps),
    st.builds(
        lambda v: json.dumps({"custom_id": v, "result": {}}),
        ANY_JSON.filter(lambda v: not isinstance(v, str)),
    ),
    st.builds(lambda t: json.dumps({"custom_id": "x-" + t, "result": {}}), TEXTS),
)
