"""One odd result line never stops a collect (issue 21): whatever a line holds, its row ends `done` or
`dead` with a reason, every batch is collected in the same
run, and `etl status --check` is true. Lines are served by the emulator's `raw` outcome through the real
SDK, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from etl import pipeline, prompt
from etl.emulator import EmulatorControl, EmulatorServer
from etl.status import status
from tests.conftest import API_KEY, SharedClock, insert_docs, run_etl
from tests.harness import Harness
from tests.reliability.lines import JUNK_LINES, RESULT_LINES, good_line

EXAMPLES = int(os.environ.get("ETL_POISON_EXAMPLES", "20"))
_serial = iter(range(10**9))


def _send(rt: Harness, n: int, per_batch: int) -> list[tuple[int, int]]:
    """Enqueue n fresh documents and submit them; (queue id, batch intent) of each, in batch order."""
    tag = next(_serial)
    insert_docs(rt, [{"doc_key": f"d{tag}-{i}", "body": f"document {tag} {i}"} for i in range(n)])
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.documents == n, out
    with rt.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, batch_ref FROM etl_queue WHERE doc_key LIKE :k ORDER BY batch_ref, id"),
            {"k": f"d{tag}-%"},
        ).all()
    assert len({r.batch_ref for r in rows}) == -(-n // per_batch)
    return [(int(r.id), int(r.batch_ref)) for r in rows]


def _serve(control: EmulatorControl, lines: dict[int, str]) -> None:
    control.set_faults(
        outcomes=[
            # q<row>_<intent>_<installation> (etl.prompt.custom_id): the rule matches on the row
            {"custom_id": prompt.custom_id(qid) + "_.*", "outcome": "raw", "line": line}
            for qid, line in lines.items()
        ]
    )


def _fates(rt: Harness, ids: list[int]) -> dict[int, tuple[str, str | None]]:
    with rt.engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT id, status, reason FROM etl_queue WHERE id IN ({','.join(map(str, ids))})")
        ).all()
    return {int(r.id): (r.status, r.reason) for r in rows}


def _batch_states(rt: Harness, refs: set[int]) -> dict[int, tuple[str, str | None]]:
    with rt.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, status, error FROM etl_batches")).all()
    return {int(r.id): (r.status, r.error) for r in rows if int(r.id) in refs}


def _assert_settled(rt: Harness, sent: list[tuple[int, int]]) -> dict[int, tuple[str, str | None]]:
    """The property: no row left `submitted`, every failure with a reason, every batch collected, health OK."""
    fates = _fates(rt, [qid for qid, _ in sent])
    for qid, (state, reason) in fates.items():
        assert state in ("done", "dead"), (qid, state, reason)
        if state != "done":
            assert reason, (qid, state)
    batches = _batch_states(rt, {ref for _, ref in sent})
    assert all(s == "collected" for s, _ in batches.values()), batches
    _, healthy, problems = status(rt.config, rt.db, rt.owner, rt.clock())
    assert healthy, problems
    return fates


@pytest.fixture
def two_batches(make_runtime: Callable[..., Harness]) -> Harness:
    # One attempt: a retryable outcome (expired, api_error, an unknown result type) ends the row `dead`
    # ("gave up after 1 attempts") instead of queueing it for the next example's submit.
    return make_runtime(submit={"max_requests_per_batch": 3, "max_attempts": 1})


VARIANTS: dict[str, tuple[Any, str]] = {
    # (what the result's message holds, the words its row's reason must contain)
    "lone surrogate": ({"text": "bad \ud800 text"}, "lone surrogate U+D800"),
    "NUL": ({"text": "a\x00b"}, "NUL character"),
    "message is a list": ([1, 2], "`message` is a list"),
    "usage is a list": ({"usage": [1]}, "`usage` is a list"),
}


def _poisoned(variant: str) -> str:
    value, _ = VARIANTS[variant]
    if isinstance(value, dict) and "text" in value:
        return good_line(text=value["text"])
    if isinstance(value, dict):
        line = json.loads(good_line())
        line["result"]["message"].update(value)
        return json.dumps(line)
    line = json.loads(good_line())
    line["result"]["message"] = value
    return json.dumps(line)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_poison_line_in_the_first_batch_kills_its_row_only_and_the_second_batch_is_collected(
    variant: str, two_batches: Harness, control: EmulatorControl, clock: SharedClock
) -> None:
    rt = two_batches
    sent = _send(rt, 6, 3)
    poison = sent[1][0]  # in the first batch
    _serve(control, {poison: _poisoned(variant)})
    clock.advance(3600)
    out = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.batches_collected == 2, out.problems
    fates = _assert_settled(rt, sent)
    state, reason = fates.pop(poison)
    nul_on_sqlite = variant == "NUL" and rt.engine.dialect.name == "sqlite"  # SQLite stores a NUL
    if nul_on_sqlite:
        assert state == "done"
    else:
        assert state == "dead" and VARIANTS[variant][1] in (reason or ""), (state, reason)
    assert {s for s, _ in fates.values()} == {"done"}


def test_the_cli_collect_says_problems_in_lines_and_status_check_passes_after(
    two_batches: Harness, control: EmulatorControl, clock: SharedClock, db_url: str, emulator: EmulatorServer
) -> None:
    rt = two_batches
    sent = _send(rt, 6, 3)
    _serve(control, {sent[0][0]: _poisoned("message is a list"), sent[4][0]: "[1, 2]\n" + good_line()})
    clock.advance(3600)
    env = {
        "ETL_DATABASE_URL": db_url,
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "ETL_CONFIG": rt.config.source,
        **clock.env,
    }
    done = run_etl(["collect", "--no-report"], env)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 3, done.stderr  # finished, with the unreadable line reported
    assert "unreadable result line" in done.stderr
    _assert_settled(rt, sent)
    check = run_etl(["status", "--check"], env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "health: OK" in check.stdout


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    lines=st.lists(RESULT_LINES, min_size=1, max_size=4),
    junk=st.lists(JUNK_LINES, max_size=2),
    where=st.integers(0, 5),
)
def test_any_result_line_in_any_position_settles_every_row_and_collects_every_batch(
    two_batches: Harness,
    control: EmulatorControl,
    clock: SharedClock,
    lines: list[str],
    junk: list[str],
    where: int,
) -> None:
    """Generated: any JSON value where an object is promised, any text (lone surrogates, NUL, huge),
    missing, null and extra fields, plus lines that name no row; in either of two batches."""
    rt = two_batches
    sent = _send(rt, 6, 3)
    served = {sent[(where + i) % 6][0]: line for i, line in enumerate(lines)}
    if junk:
        qid = sent[where][0]
        served[qid] = "\n".join(junk) + "\n" + served[qid]
    _serve(control, served)
    clock.advance(3600)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    fates = _assert_settled(rt, sent)
    untouched = [qid for qid, _ in sent if qid not in served]
    assert all(fates[q][0] == "done" for q in untouched)
    control.clear_faults()


def test_status_check_fails_while_an_ended_batch_has_rows_submitted(
    two_batches: Harness, clock: SharedClock
) -> None:
    """A collect killed after it saw the batch ended (nothing recorded on the batch) still fails the check."""
    from etl.store import batches as intents

    rt = two_batches
    sent = _send(rt, 3, 3)
    clock.advance(3600)
    with rt.engine.connect() as conn:
        intent = intents.get(conn, sent[0][1])
    assert intent is not None and intent.batch_id is not None
    remote = rt.provider.retrieve(intent.batch_id)
    with rt.engine.begin() as conn:
        assert intents.update_remote(conn, intent.id, remote)
    _, healthy, problems = status(rt.config, rt.db, rt.owner, rt.clock())
    assert not healthy
    assert any(intent.batch_id in p and "3 row(s) still 'submitted'" in p for p in problems), problems
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    _assert_settled(rt, sent)


def test_a_row_that_cannot_be_encoded_is_rejected_with_its_reason_and_the_others_are_sent(
    make_runtime: Callable[..., Harness],
) -> None:
    """Metadata nested deeper than Python's stack: once a RecursionError out of every submit."""
    rt = make_runtime()
    deep = '{"title": ' + "[" * 3000 + "]" * 3000 + "}"
    insert_docs(
        rt,
        [
            {"doc_key": "fine-1", "body": "a fine document"},
            {"doc_key": "deep", "body": "numbers", "task": "classify", "metadata": deep},
            {"doc_key": "fine-2", "body": "another fine document"},
        ],
    )
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.documents == 2 and out.rejected == 1, out
    with rt.engine.connect() as conn:
        rows = {r.doc_key: r for r in conn.execute(text("SELECT doc_key, status, reason FROM etl_queue"))}
    assert rows["deep"].status == "rejected"
    assert "RecursionError" in rows["deep"].reason, rows["deep"].reason
    assert {rows["fine-1"].status, rows["fine-2"].status} == {"submitted"}


NO_TEXT = {
    "no text block: tool_use": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
    "no text block: thinking": [{"type": "thinking", "thinking": "hmm", "signature": "s"}],
    "no text block: empty content": [],
}


def test_answers_without_text_are_stored_done_with_a_reason_the_report_counts(
    two_batches: Harness, control: EmulatorControl, clock: SharedClock
) -> None:
    """Once stored `done` with an empty text and no word: now the reason says what the answer held."""
    from etl import report
    from tests.reliability.lines import good_message, line

    rt = two_batches
    sent = _send(rt, 3, 3)
    lines = {}
    for (qid, _), content in zip(sent, NO_TEXT.values(), strict=True):
        lines[qid] = line({"type": "succeeded", "message": {**good_message(), "content": content}})
    _serve(control, lines)
    clock.advance(3600)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    fates = _assert_settled(rt, sent)
    assert [fates[qid] for qid, _ in sent] == [("done", why) for why in NO_TEXT]
    with rt.engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM etl_results WHERE output_text = ''")).scalar_one()
    assert stored == 3
    body = report.build(rt.config, rt.db, clock(), None)
    assert {k: v for k, v in body["failures"].items() if "note" in k} == {
        f"succeeded with a note: {why}": 1 for why in NO_TEXT
    }
