"""Reconciliation of creates whose outcome is unknown, in process, on both databases."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import text

from etl import failpoints, pipeline, reconciler
from etl.emulator import EmulatorControl
from tests.conftest import SharedClock, insert_docs, queue_rows
from tests.harness import Harness
from tests.ledger import by_row


def intent_statuses(rt: Harness) -> list[tuple[int, str]]:
    with rt.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, status FROM etl_batches ORDER BY id"))]


def test_lookalike_unknown_intents_wait_for_custom_id_proof_and_nothing_is_paid_twice(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    """Intent 1's create never reached the API; intent 2's did, but its answer was lost. Both have five
    requests and were sent within a minute: size and time cannot tell whose batch the API holds."""
    rt = make_runtime(submit={"max_requests_per_batch": 5, "reconcile_grace_seconds": 20})
    insert_docs(rt, [{"doc_key": f"a{i}", "body": f"look-alike {i}"} for i in range(10)])
    control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 500, "times": 1}])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    control.clear_faults()
    assert intent_statuses(rt) == [(1, "unknown"), (2, "unknown")]
    assert control.ledger()["batches_created"] == 1

    clock.advance(30)  # past the grace period, but the batch at the API has not ended yet
    out = reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)
    assert (out.adopted, out.released_unknown, out.still_unknown) == (0, 0, 2)

    clock.advance(60)  # ended: its first custom_id names a row of intent 2
    out = reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)
    assert (out.adopted, out.released_unknown) == (1, 1)
    assert intent_statuses(rt) == [(1, "released"), (2, "submitted")]

    pipeline.submit(
        rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop
    )  # intent 1's rows, which the API never had, go out now
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    rows = queue_rows(rt)
    assert {r["status"] for r in rows.values()} == {"done"}
    billed = by_row(control.ledger())
    assert sorted(billed) == sorted(f"q{r['id']}" for r in rows.values())
    assert set(billed.values()) == {1}


def test_an_unknown_create_whose_batch_exists_is_adopted_not_resent(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    insert_docs(runtime, [{"doc_key": f"u{i}", "body": f"unknown {i}"} for i in range(4)])
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    assert (
        pipeline.submit(
            runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
        ).unknown
        == 1
    )
    control.clear_faults()
    out = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )  # reconciles first: the look-alike has not ended, so its rows wait
    assert out.documents == 0
    assert intent_statuses(runtime) == [(1, "unknown")]
    clock.advance(120)
    col = pipeline.collect(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )  # reconciles first: ended, its custom_ids prove it ours; collected now
    assert intent_statuses(runtime) == [(1, "collected")]
    assert col.succeeded == 4
    assert control.ledger()["batches_created"] == 1
    assert set(by_row(control.ledger()).values()) == {1}


def test_an_unknown_create_that_never_reached_the_api_is_released_after_the_grace_period(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    insert_docs(runtime, [{"doc_key": f"n{i}", "body": f"never sent {i}"} for i in range(3)])
    control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 529, "times": 1}])
    assert (
        pipeline.submit(
            runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
        ).unknown
        == 1
    )
    control.clear_faults()
    assert (
        reconciler.run(
            runtime.config, runtime.db, runtime.api, runtime.clock, runtime.should_stop
        ).still_unknown
        == 1
    )  # inside the grace period: wait
    clock.advance(runtime.config.submit.reconcile_grace_seconds + 1)
    out = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert out.documents == 3
    assert {r["attempts"] for r in queue_rows(runtime).values()} == {0}
    assert control.ledger()["batches_created"] == 1


def test_a_process_stalled_between_fence_and_create_past_its_lease_does_not_send(
    runtime: Harness, clock: SharedClock, control: EmulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert_docs(runtime, [{"doc_key": f"s{i}", "body": f"stalled {i}"} for i in range(3)])
    real_hit = failpoints.hit

    def stall(name: str) -> None:
        if name == "submit.after_fence":
            clock.offset += timedelta(seconds=runtime.config.submit.claim_lease_seconds + 1)
        real_hit(name)

    monkeypatch.setattr(failpoints, "hit", stall)
    out = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert (out.batches, out.stopped) == (0, "lease lost")
    assert control.ledger()["batches_created"] == 0
    assert intent_statuses(runtime) == [(1, "released")]
    assert {r["status"] for r in queue_rows(runtime).values()} == {"queued"}


def test_a_batch_another_tool_made_is_reported_once_not_every_run(runtime: Harness) -> None:
    from structlog.testing import capture_logs

    from etl.prompt import batch_body, encode_request

    params = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    foreign = runtime.provider.create_batch(batch_body([encode_request("other-tool-1", params)]))
    seen = []
    for _ in range(3):
        with capture_logs() as logs:
            assert (
                foreign.id
                in reconciler.run(
                    runtime.config, runtime.db, runtime.api, runtime.clock, runtime.should_stop
                ).unmatched_remote
            )
        seen.append([e for e in logs if e["event"] == "remote_batches_unmatched"])
    assert [len(s) for s in seen] == [1, 0, 0]
    assert seen[0][0]["batch_ids"] == [foreign.id]
