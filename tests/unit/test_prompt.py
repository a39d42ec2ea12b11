"""Building a request from a row, and every reason a row can be rejected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl import config
from etl.config import Task
from etl.prompt import (
    MAX_DOC_KEY_BYTES,
    Rejection,
    Row,
    batch_body,
    build_params,
    custom_id,
    encode_request,
    queue_id_of,
)

ROOT = Path(__file__).resolve().parents[2]
TASKS = config.load({}, ROOT / "config" / "etl.toml").tasks


def params(**row: Any) -> dict[str, Any]:
    base = {"id": 1, "doc_key": "k", "task": "default", "body": "hello", "metadata": None}
    base.update(row)
    return build_params(Row(**base), TASKS, 1000)


def test_default_task_builds_a_cached_system_prompt_and_the_templated_body() -> None:
    p = params(body="The quarterly numbers")
    assert p["model"] == "claude-haiku-4-5"
    assert p["messages"] == [{"role": "user", "content": "Summarise this document.\n\nThe quarterly numbers"}]
    assert p["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert "output_config" not in p and "temperature" not in p


def test_structured_task_fills_metadata_and_asks_for_json() -> None:
    p = params(task="classify", body="text", metadata='{"title": "Q3 plan", "n": 3}')
    assert p["messages"][0]["content"].startswith("Title: Q3 plan\n\ntext")
    assert p["output_config"]["format"]["type"] == "json_schema"
    assert p["output_config"]["format"]["schema"]["required"] == ["category", "confidence"]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"body": ""}, "body is empty or only whitespace"),
        ({"body": " \n\t"}, "body is empty or only whitespace"),
        ({"body": None}, "body is NULL"),
        ({"body": "x" * 1001}, "body is 1,001 bytes; the limit is 1,000 (submit.max_body_bytes)"),
        ({"body": "é" * 501}, "body is 1,002 bytes; the limit is 1,000 (submit.max_body_bytes)"),
        ({"body": "a\x00b"}, "body contains NUL bytes (binary data?): only text can be sent"),
        ({"body": "bad \udcff byte"}, "body is not valid UTF-8 text (bad character at position 4)"),
        ({"task": "nope"}, "task 'nope' does not exist (configured tasks: classify, default)"),
        ({"task": "classify"}, "metadata lacks 'title' required by the template of task 'classify'"),
        ({"task": "classify", "metadata": "{oops"}, "metadata is not valid JSON"),
        ({"task": "classify", "metadata": "[1, 2]"}, "metadata must be a JSON object, got list"),
    ],
)
def test_rows_that_can_never_be_sent_are_rejected_with_a_readable_reason(
    row: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Rejection) as err:
        params(**row)
    assert err.value.reason.startswith(reason)


def test_custom_ids_map_back_to_exactly_one_row_and_fit_the_api_pattern() -> None:
    assert custom_id(42) == "q42" and queue_id_of("q42") == 42  # legacy, batches sent before issue 20
    assert custom_id(42, "0123456789ab", 7) == "q42_7_0123456789ab"
    assert queue_id_of("x42") is None and queue_id_of("q4x") is None
    body = batch_body([encode_request(custom_id(7), {"a": "é"}), encode_request(custom_id(8), {"b": 1})])
    decoded = json.loads(body)
    assert [r["custom_id"] for r in decoded["requests"]] == ["q7", "q8"]
    assert decoded["requests"][0]["params"] == {"a": "é"}


@given(
    st.integers(1, 2**63 - 1),
    st.integers(1, 2**63 - 1),
    st.text("0123456789abcdef", min_size=12, max_size=12),
)
def test_a_custom_id_names_its_row_intent_and_installation_and_nothing_else_reads_as_one(
    qid: int, intent: int, installation: str
) -> None:
    import re

    from etl.prompt import SentId, parse_custom_id

    cid = custom_id(qid, installation, intent)
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cid)
    assert parse_custom_id(cid) == SentId(qid, intent, installation)
    # another installation's id, a look-alike of another shape, a typo: never read as ours
    for other in (cid.upper(), cid + "_", cid.replace("_", "-"), cid[:-1], "x" + cid, cid + "0"):
        sent = parse_custom_id(other)
        assert (
            sent is None
            or sent.installation != installation
            or (sent.queue_id, sent.intent)
            != (
                qid,
                intent,
            )
        )


@settings(deadline=None)
@given(st.text(min_size=1).filter(lambda s: s.strip() and "\x00" not in s), st.integers(1, 10**12))
def test_the_estimators_request_size_is_the_encoded_requests_length(body: str, qid: int) -> None:
    from etl.prompt import encode_request, request_size

    task = Task("t", "claude-haiku-4-5", "Doc:\n{body}", 100, system="Be brief é", cache_system=True)
    try:
        params = build_params(Row(qid, "k", "t", body, None), {"t": task}, 10_000)
    except Rejection:
        return
    cid = custom_id(qid, "0123456789ab", qid)
    assert request_size(cid, params) == len(encode_request(cid, params))


INVISIBLE = st.sampled_from(
    [
        "\u200b",
        "\u200c",
        "\u200d",
        "\u2060",
        "\ufeff",
        "\u00ad",
        "\u180e",
        "\u3164",
        "\u2800",
        " ",
        "\t",
        "\u00a0",
        "\u2003",
        "\u2028",
        "\u2029",
        "\u202e",
        "\n",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(INVISIBLE, min_size=1, max_size=30).map("".join))
def test_a_body_of_only_invisible_characters_is_rejected(body: str) -> None:
    with pytest.raises(Rejection, match=r"empty or only whitespace|only invisible characters"):
        params(body=body)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(INVISIBLE, max_size=10).map("".join),
    st.characters(categories=("L", "N", "P", "S")).filter(
        lambda c: c not in "\u3164\u2800\u115f\u1160\uffa0"
    ),
)
def test_one_visible_character_among_invisible_ones_is_enough(padding: str, visible: str) -> None:
    params(body=padding + visible + padding)


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=1200))
@settings(max_examples=100, deadline=None)
def test_a_doc_key_is_sent_only_within_its_byte_limit(key: str) -> None:
    size = len(key.encode("utf-8"))
    if size > MAX_DOC_KEY_BYTES:
        with pytest.raises(Rejection, match=f"doc_key is {size:,} bytes; the limit is 1,024"):
            params(doc_key=key)
    elif "\x00" not in key:
        params(doc_key=key)


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=30), st.integers(14, 400))
def test_a_batch_body_built_in_one_buffer_is_the_joined_body_and_knows_its_size(
    parts: list[bytes], cap: int
) -> None:
    from etl.prompt import BatchBody

    built, taken = BatchBody(), []
    for part in parts:
        fits = built.fits(part, cap)
        assert fits == (len(batch_body([*taken, part])) <= cap)
        if fits:
            built.add(part)
            taken.append(part)
            assert built.size == len(batch_body(taken))
    size = built.size
    body = built.finish()
    assert body == batch_body(taken) and len(body) == size and built.count == len(taken)


_DIGITS = (
    "0123456789\u0660\u0661\u0662"  # Arabic-Indic digits too: str.isdigit() says yes, a custom_id must say no
)
_INSTALLATIONS = ["3d1219c7c4c5", "aaaaaaaaaaaa"]


def _near(canonical: str, other: list[str]) -> st.SearchStrategy[str]:
    """Mostly the canonical piece, sometimes a look-alike."""
    return st.one_of(st.just(canonical), st.just(canonical), st.sampled_from(other))


@st.composite
def _ids_near(draw: st.DrawFn) -> tuple[str, int, str]:
    """An intent, an installation, and an id that is, or nearly is, one of theirs."""
    intent = draw(st.sampled_from([7, 8, 70]))
    inst = draw(st.sampled_from(_INSTALLATIONS))
    if draw(st.integers(0, 5)) == 0:
        return draw(st.text(max_size=40)), intent, inst
    cid = (
        draw(_near("q", ["Q", "", "qq"]))
        + draw(st.text(_DIGITS, max_size=22))
        + draw(_near("_", ["-", "__", ""]))
        + draw(_near(str(intent), [f"0{intent}", f"{intent}0", "8", ""]))
        + draw(_near("_", ["-", ""]))
        + draw(_near(inst, [inst.upper(), inst[:-1], inst + "5", "3d1219c7c4c6"]))
    )
    return cid, intent, inst


@given(_ids_near())
def test_the_collectors_shortcut_reads_an_id_as_the_full_parse_does(case: tuple[str, int, str]) -> None:
    """`row_of` (one endswith, no split) is the collector's shortcut for its own lines: whatever it reads
    as a row, `parse_custom_id` reads as that row of that intent of that installation; and every id the
    full parse reads as this intent's row of canonical form, the shortcut reads too."""
    from etl.prompt import SentId, id_suffix, parse_custom_id, row_of

    cid, intent, inst = case
    fast = row_of(cid, id_suffix(intent, inst))
    sent = parse_custom_id(cid)
    if fast is not None:
        assert sent == SentId(fast, intent, inst)
    elif sent is not None and cid == custom_id(sent.queue_id, inst, intent):
        raise AssertionError(f"{cid!r} is this intent's canonical id, and the shortcut missed it")
