"""Bad input: every kind of unusable row ends `rejected` with a readable reason, and none blocks the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.reliability.harness import Scenario

BAD: dict[str, tuple[dict[str, Any], str]] = {
    "empty": ({"body": ""}, "body is empty or only whitespace"),
    "blank": ({"body": " \n\t "}, "body is empty or only whitespace"),
    "huge": ({"body": "x" * 20_001}, "body is 20,001 bytes; the limit is 20,000"),
    "no-task": ({"body": "hello", "task": "translate"}, "task 'translate' does not exist"),
    "no-title": (
        {"body": "hello", "task": "classify", "metadata": '{"author": "me"}'},
        "metadata lacks 'title'",
    ),
    "meta-array": (
        {"body": "hello", "task": "classify", "metadata": "[1, 2]"},
        "metadata must be a JSON object",
    ),
}
SQLITE_ONLY: dict[str, tuple[dict[str, Any], str]] = {
    "nul": ({"body": "binary\x00data"}, "contains NUL bytes"),
    "meta-not-json": (
        {"body": "hello", "task": "classify", "metadata": "{not json"},
        "metadata is not valid JSON",
    ),
}
INVALID_UTF8 = {
    "bad-utf8": ("68656c6c6f20ff fe20776f726c64", "not valid UTF-8"),
    "lone-surrogate": ("eda080", "not valid UTF-8"),
}


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_each_bad_row_is_rejected_with_its_reason_and_good_rows_still_flow(
    db: str, make_scenario: Callable[..., Scenario]
) -> None:
    sc = make_scenario("bad input, one of each", db, max_body_bytes=20_000)
    cases = dict(BAD) | (SQLITE_ONLY if db == "sqlite" else {})
    docs = []
    for i in range(3):
        docs.append({"doc_key": f"good-{i}", "body": f"fine document {i}"})
    for key, (doc, _) in cases.items():
        docs.append({"doc_key": key, **doc})
    docs.append(
        {"doc_key": "good-classify", "body": "numbers", "task": "classify", "metadata": '{"title": "Q3"}'}
    )
    sc.insert(docs)
    expected = {k: why for k, (_, why) in cases.items()}
    if db == "sqlite":
        with sc.engine.begin() as conn:
            for key, (hexbytes, why) in INVALID_UTF8.items():
                conn.execute(
                    text(
                        f"INSERT INTO etl_queue (doc_key, body) VALUES (:k, CAST(x'{hexbytes.replace(' ', '')}' AS TEXT))"
                    ),
                    {"k": key},
                )
                expected[key] = why
    else:
        with pytest.raises(Exception, match=r"(?i)nul|0x00"):
            sc.insert([{"doc_key": "nul", "body": "binary\x00data"}])
    sc.complete()
    with sc.engine.connect() as conn:
        rows = {r.doc_key: r for r in conn.execute(text("SELECT doc_key, status, reason FROM etl_queue"))}
    wrong = [
        k for k, why in expected.items() if rows[k].status != "rejected" or why not in (rows[k].reason or "")
    ]
    good = [k for k in rows if k.startswith("good")]
    ok = not wrong and all(rows[k].status == "done" for k in good)
    sc.verdict(
        (
            ok,
            f"{len(expected)} bad rows rejected with their reasons {wrong or ''}; {len(good)} good rows done",
        )
    )


def _documents(db: str) -> list[dict[str, Any]]:
    """At least 1,000 Hypothesis-generated rows: any text (NUL only where the database can store it), any
    task name, metadata that may be missing, not JSON, not an object, or lacking the template's field."""
    # Lone surrogates cannot pass through a driver as str (the one-of-each test writes them as raw bytes).
    nul = ("\x00",) if db == "postgresql" else ()
    alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters=nul)
    body = st.text(alphabet, max_size=40)
    meta = st.one_of(
        st.none(),
        st.just('{"title": "t"}'),
        st.dictionaries(st.sampled_from(["title", "x"]), st.text(alphabet, max_size=8)).map(
            lambda d: __import__("json").dumps(d)
        ),
        st.just("[1]"),
        st.just('"str"'),
    )
    if db == "sqlite":
        meta = st.one_of(meta, st.text(alphabet, max_size=10))
    doc = st.fixed_dictionaries(
        {"body": body, "task": st.sampled_from(["default", "classify", "nope"]), "metadata": meta}
    )
    out: list[dict[str, Any]] = []

    @settings(
        max_examples=40,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(doc, min_size=40, max_size=40))
    def gather(batch: list[dict[str, Any]]) -> None:
        out.extend(batch)

    while len(out) < 1000:
        gather()
    return [{"doc_key": f"h{i}", **d} for i, d in enumerate(out)]


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_thousand_generated_documents_each_end_in_a_valid_state(
    db: str, make_scenario: Callable[..., Scenario]
) -> None:
    sc = make_scenario(
        "bad input, 1000+ Hypothesis documents", db, max_requests_per_batch=2000, chunk_size=2000
    )
    docs = _documents(db)
    sc.insert(docs)
    sc.complete()
    counts = sc.statuses()
    no_reason = sc.count(
        "SELECT count(*) FROM etl_queue WHERE status = 'rejected' AND (reason IS NULL OR reason = '')"
    )
    ok = set(counts) <= {"done", "rejected"} and counts.get("done", 0) > 0 and counts.get("rejected", 0) > 0
    sc.verdict((ok and no_reason == 0, f"{len(docs)} generated documents: {counts}"))
