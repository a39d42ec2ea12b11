"""`retry-after` on a refused create is respected (issue 21): no create before it, by a later `etl submit`
or the daemon's re-run of the slot, which the night's cut-off (`schedule.retry_until`) still bounds. Once
creates refused with `retry-after: 3600` were tried again every 5-40 s."""

from __future__ import annotations

from datetime import timedelta

from etl import pipeline, recovery
from etl.emulator import EmulatorControl
from etl.store import state
from tests.conftest import SharedClock, insert_docs, queue_rows
from tests.harness import Harness


def _batches_created(control: EmulatorControl) -> int:
    return len(control.ledger().get("batches", []) or [])


def test_a_create_refused_with_retry_after_is_not_tried_again_before_it(
    runtime: Harness, control: EmulatorControl, clock: SharedClock
) -> None:
    rt = runtime
    insert_docs(rt, [{"doc_key": f"d{i}", "body": f"document {i}"} for i in range(3)])
    control.set_faults(
        rules=[{"endpoint": "create", "action": "status", "status": 429, "retry_after": 3600, "times": 1}]
    )
    first = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert first.documents == 0 and first.stopped and "rate limited" in first.stopped
    created = control.ledger()
    control.clear_faults()

    again = pipeline.submit(
        rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop
    )  # the API would accept now, but it asked for an hour
    assert again.documents == 0 and again.stopped and "no batch create before" in again.stopped
    assert control.ledger() == created
    assert {r["status"] for r in queue_rows(rt).values()} == {"queued"}

    # The daemon's re-run of a partial slot waits for it too (its own backoff is 5 s).
    with rt.engine.begin() as conn:
        slot = clock() - timedelta(minutes=1)
        assert state.start_run(conn, "submit", slot, "run-1", rt.owner, clock() - timedelta(seconds=30))
        state.finish_run(
            conn, "run-1", "partial", f"stopped: {first.stopped}", clock() - timedelta(seconds=20)
        )
    assert recovery.due_reruns(rt.config.schedule, rt.db, clock(), ("submit",)) == []

    clock.advance(3601)
    rerun = recovery.due_reruns(rt.config.schedule, rt.db, clock(), ("submit",))
    in_time = clock() < recovery.cutoff(rt.config.schedule, slot)
    assert len(rerun) == (1 if in_time else 0)  # past schedule.retry_until the slot is given up instead
    done = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert done.documents == 3, done
