from __future__ import annotations

from typing import Any

import pytest

from etl import answer
from etl.store import events


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ([{"type": "text", "text": "one block"}], "one block"),
        (
            [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t"}, {"type": "text", "text": "b"}],
            "ab",
        ),
        ([{"type": "tool_use", "id": "t"}], ""),
        ([], ""),
        (None, ""),
        ("not a list", ""),
        ([{"type": "text", "text": None}], ""),
        (["not a block", {"type": "text", "text": "kept"}], "kept"),
    ],
)
def test_text_of_joins_text_blocks_and_ignores_anything_malformed(content: Any, text: str) -> None:
    assert answer.text_of({"content": content}) == text


def test_a_tally_absorbs_another_ones_counts_and_amounts() -> None:
    a, b = events.Tally(), events.Tally()
    a.add("succeeded", "default", None, 3, input_tokens=30, cost_usd=0.5)
    a.add("dead", "default", "invalid_request_error")
    b.add("succeeded", "default", None, 2, input_tokens=20, cost_usd=0.25)
    b.add("requeued", "classify", "overloaded_error")
    a.absorb(b)
    assert {k: dict(v) for k, v in a.rows.items()} == {
        ("succeeded", "default", None): {"documents": 5, "input_tokens": 50, "cost_usd": 0.75},
        ("dead", "default", "invalid_request_error"): {"documents": 1},
        ("requeued", "classify", "overloaded_error"): {"documents": 1},
    }
