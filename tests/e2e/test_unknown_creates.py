"""A create whose outcome is unknown, or a batch that only looks like ours, is settled on the API's word and
never on a guess: a broken results read, clocks that disagree, a connection never made, a refused read
(issue 12's findings 1 and 2, issue 14 item 8), on both databases.

Every test ends the same way: every good document `done`, nothing billed twice (the emulator's ledger),
no batch left open, and `etl status` healthy; and while something was stuck, `etl status` said so.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from etl import config as config_mod
from etl import pipeline, reconciler
from etl.emulator import EmulatorControl
from etl.prompt import encode_request
from tests.conftest import API_KEY, SharedClock, insert_docs, queue_rows
from tests.e2e.settled import GRACE, assert_settled, docs, problems
from tests.harness import Harness, build
from tests.ledger import by_row

# -- finding 1: a broken results read is not proof that a look-alike is someone else's -----------------


def test_a_lookalike_whose_results_read_breaks_is_waited_for_not_released(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    """100 documents, batches of 50; the first create's answer is lost (the batch was made); at the next
    run the look-alike's results stream is reset before its first line."""
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    insert_docs(rt, docs(100))
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    control.clear_faults()
    assert any("create outcome unknown" in p for p in problems(rt))

    clock.advance(GRACE + 120)  # past the grace, and the look-alike has ended
    control.set_faults(
        rules=[{"endpoint": "results", "action": "stream_reset", "after_lines": 0, "times": 1}]
    )
    out = pipeline.submit(
        rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop
    )  # reconciles first: the read breaks, so intent 1 waits; the other 50 go out
    control.clear_faults()
    assert out.documents == 50
    with rt.engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM etl_batches WHERE id = 1")).scalar_one() == "unknown"
    stuck = problems(rt)
    assert any("intent 1" in p and "past its grace" in p for p in stuck), stuck

    assert (
        reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop).adopted == 1
    )  # readable now: its custom_ids prove it ours
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert control.ledger()["batches_created"] == 2
    assert_settled(rt, control, 100)


# -- finding 2: ownership does not need our clock and the API's to agree -------------------------------


@pytest.mark.parametrize("skew", [600, -1200], ids=["host-ahead-600s", "host-behind-1200s"])
def test_an_ambiguous_create_is_adopted_whatever_the_host_clock_says(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl, skew: int
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    clock.offset += timedelta(seconds=skew)  # the host's clock only
    insert_docs(rt, docs(100))
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    control.clear_faults()
    clock.advance(GRACE + 120)
    pipeline.submit(
        rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop
    )  # adopts intent 1 (proved by its results), sends the other 50
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert control.ledger()["batches_created"] == 2
    assert_settled(rt, control, 100)


@pytest.mark.parametrize("skew", [600, -1200], ids=["host-ahead-600s", "host-behind-1200s"])
def test_an_unknown_create_that_made_no_batch_is_released_once_the_list_is_read_past_its_anchor(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl, skew: int
) -> None:
    """Batches recorded before the create bound the list read; a look-alike of someone else (same size,
    not ended) holds the release until it ends and its results prove it is not ours."""
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    clock.offset += timedelta(seconds=skew)
    insert_docs(rt, docs(50, "a"))
    assert (
        pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).batches == 1
    )  # the anchor of the next intent
    insert_docs(rt, docs(50, "b"))
    control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 529, "times": 1}])
    assert (
        pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    )  # no batch was made
    control.clear_faults()
    with rt.engine.connect() as conn:
        anchor = conn.execute(
            text("SELECT anchor_batch_id FROM etl_batches WHERE status = 'unknown'")
        ).scalar_one()
        first = conn.execute(text("SELECT batch_id FROM etl_batches WHERE status = 'submitted'")).scalar_one()
    assert anchor == first
    # Someone else's batch of the same size, made after ours with the same API key.
    foreign = [
        encode_request("q0", {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": []}).replace(
            b'"q0"', f'"other-{i}"'.encode()
        )
        for i in range(50)
    ]
    for i, part in enumerate(foreign):
        foreign[i] = part.replace(b'"messages":[]', b'"messages":[{"role":"user","content":"hi"}]')
    rt.provider.create_batch(b'{"requests":[' + b",".join(foreign) + b"]}")

    clock.offset += timedelta(seconds=GRACE + 1)  # our grace is over, the API's
    out = reconciler.run(
        rt.config, rt.db, rt.api, rt.clock, rt.should_stop
    )  # clock has not moved: the foreign batch has not ended, so intent 2 waits
    assert (out.released_unknown, out.still_unknown) == (0, 1)
    clock.advance(120)  # it ends; its first custom_id is not one of ours: proven absent
    out = reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)
    assert out.released_unknown == 1
    pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    ours = {k: v for k, v in by_row(control.ledger()).items() if k.startswith("q")}
    assert len(ours) == 100 and set(ours.values()) == {1}
    assert_settled(rt, control, 100)


# -- issue 14 item 8: a connection that was never made sent nothing -----------------------------------


def test_a_refused_connection_sends_nothing_and_the_rows_go_back_at_once(
    make_runtime: Callable[..., Harness],
    clock: SharedClock,
    control: EmulatorControl,
    config_file: Callable[..., Path],
    db_url: str,
) -> None:
    good = make_runtime()
    env = {
        "ETL_DATABASE_URL": db_url,
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:1",
        "ANTHROPIC_API_KEY": API_KEY,
    }
    rt = build(config_mod.load(env, config_file()), clock=clock)
    try:
        insert_docs(rt, docs(4))
        out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
        assert out.unknown == 0 and out.stopped is not None and out.stopped.startswith("API unreachable")
        assert {r["status"] for r in queue_rows(rt).values()} == {"queued"}
        assert problems(rt) == []
    finally:
        rt.close()
    assert (
        pipeline.submit(good.config, good.db, good.api, good.me, good.clock, good.should_stop).documents == 4
    )  # at once: no grace to wait out
    clock.advance(120)
    pipeline.collect(good.config, good.db, good.api, good.me, good.clock, good.should_stop)
    assert_settled(good, control, 4)


def test_an_unknown_intent_says_when_it_is_released_and_the_operator_can_release_it(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime()
    insert_docs(rt, docs(4))
    control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 504, "times": 1}])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    control.clear_faults()
    stuck = problems(rt)
    assert any("released at the first reconcile after" in p and "--release 1" in p for p in stuck), stuck
    assert reconciler.release_by_operator(rt.db, rt.clock(), 1) == 4
    with pytest.raises(Exception, match="intent 1 is released, not unknown"):
        reconciler.release_by_operator(rt.db, rt.clock(), 1)
    pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert_settled(rt, control, 4)


# -- the same rule elsewhere: a refused results read is not proof that the results are gone -------------


@pytest.mark.parametrize("skew_days", [0, 30], ids=["same-clock", "host-30-days-ahead"])
def test_results_are_treated_as_archived_only_on_the_apis_word(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl, skew_days: int
) -> None:
    """A 404 from the results endpoint, or a host clock past the 29 days, used to re-queue every row of a
    batch whose results still existed: all of them paid for twice."""
    rt = make_runtime()
    insert_docs(rt, docs(6))
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 6
    clock.advance(120)
    clock.offset += timedelta(days=skew_days)
    control.set_faults(rules=[{"endpoint": "results", "action": "status", "status": 404, "times": 1}])
    out = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    control.clear_faults()
    assert (out.archived, out.batches_collected) == (0, 0)
    assert any("last collect failed" in p or "results unavailable" in p for p in problems(rt))
    assert pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).batches_collected == 1
    assert_settled(rt, control, 6)
