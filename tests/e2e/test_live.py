"""The live path end to end, on SQLite and PostgreSQL, through the real SDK against the emulator."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from etl import live, pipeline, report, routing
from etl.emulator import EmulatorControl
from etl.emulator.model import reply_text
from etl.prompt import Row, build_params
from etl.settings import Settings
from etl.store import batches as intents
from etl.store import live as live_store
from etl.store import queue as q
from etl.store import schema
from tests.conftest import SharedClock, insert_docs, queue_rows
from tests.harness import Harness

FAST = "\n[live]\nbackoff_seconds = 0.05\npoll_seconds = 0.2\n"


def ts(rt: Harness, value: datetime) -> Any:
    """A timestamp as a user's plain SQL writes it: on SQLite UTC text like `datetime('now')` gives."""
    if rt.engine.dialect.name == "sqlite":
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def results(rt: Harness) -> dict[str, dict[str, Any]]:
    with rt.warehouse.connect() as conn:  # through the table's types: money is stored scaled on SQLite
        return {r.doc_key: dict(r._mapping) for r in conn.execute(select(schema.results))}


def live_double_bills(control: EmulatorControl) -> int:
    return sum(1 for n in control.ledger()["live"]["billed"].values() if n >= 2)


def test_urgent_rows_are_answered_live_while_ordinary_rows_wait_for_the_batch(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(extra=FAST)
    now = clock()
    insert_docs(rt, [{"doc_key": f"night-{i}", "body": f"ordinary document {i}"} for i in range(4)])
    insert_docs(
        rt,
        [
            {"doc_key": "now", "body": "the board meets in ten minutes", "mode": "live"},
            {"doc_key": "soon", "body": "needed before lunch", "due_by": ts(rt, now + timedelta(minutes=10))},
            {"doc_key": "next-week", "body": "no hurry", "due_by": ts(rt, now + timedelta(days=7))},
        ],
    )

    out = live.run(rt.config, rt.db, rt.api, rt.clock, once=True)

    assert (out.succeeded, out.dead, out.rejected, out.fell_back) == (2, 0, 0, 0)
    rows = queue_rows(rt)
    assert {k: r["status"] for k, r in rows.items()} == {
        **{f"night-{i}": "queued" for i in range(4)},
        "now": "done",
        "soon": "done",
        "next-week": "queued",
    }
    got = results(rt)
    assert set(got) == {"now", "soon"}
    for key in ("now", "soon"):
        res = got[key]
        row = Row(rows[key]["id"], key, "default", _body(rt, key), None)
        params = build_params(row, rt.config.tasks, rt.config.submit.max_body_bytes)
        assert res["mode"] == "live"
        assert res["output_text"] == reply_text(params)
        assert res["custom_id"] == f"q{rows[key]['id']}"
        assert res["batch_id"].startswith("msg_")
        assert res["cost_usd"] == res["standard_cost_usd"] and res["cost_usd"] > 0
    ledger = control.ledger()
    assert ledger["live"]["calls"] == 2 and ledger["batches_created"] == 0
    assert ledger["live"]["standard_cost_usd"] == pytest.approx(
        float(sum(r["cost_usd"] for r in got.values()))
    )

    # The night: the batch takes only what the live path left.
    sub = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert sub.documents == 5
    assert {k: r["status"] for k, r in queue_rows(rt).items() if r["status"] == "submitted"}.keys() == {
        *(f"night-{i}" for i in range(4)),
        "next-week",
    }

    body = report.build(rt.config, rt.db, clock(), None)
    paths = body["paths"]
    assert paths["live"]["documents"] == 2
    assert float(paths["live"]["cost_usd"]) == pytest.approx(ledger["live"]["standard_cost_usd"])
    assert Decimal(paths["live"]["batch_would_cost_usd"]) == Decimal(paths["live"]["cost_usd"]) * (
        rt.config.pricing.batch_discount
    )
    assert paths["live"]["possibly_billed_twice"] == 0
    assert "live path" in report.render(body)


def _body(rt: Harness, key: str) -> str:
    with rt.engine.connect() as conn:
        return str(
            conn.execute(text("SELECT body FROM etl_queue WHERE doc_key = :k"), {"k": key}).scalar_one()
        )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets=st.lists(st.integers(min_value=-3, max_value=3), min_size=1, max_size=6))
def test_a_row_goes_live_exactly_when_the_batch_cannot_meet_its_due_by(
    runtime: Harness, offsets: list[int]
) -> None:
    """At the boundary (due_by = next slot + allowance, give or take microseconds), SQL and the documented
    rule agree, and the batch claim takes exactly the rows the live claim does not."""
    rt = runtime
    now = datetime.fromisoformat("2026-12-02T13:00:00+00:00")  # passed, never read from a clock
    limit = routing.cutoff(rt.config, now)
    assert limit == datetime.fromisoformat("2026-12-04T00:00:00+00:00")  # midnight slot + 24 h
    with rt.engine.begin() as conn:
        conn.execute(text("DELETE FROM etl_queue"))
    due = {f"d{i}": limit + timedelta(microseconds=off) for i, off in enumerate(offsets)}
    insert_docs(rt, [{"doc_key": k, "body": "b", "due_by": ts(rt, v)} for k, v in due.items()])
    want_live = {k for k, v in due.items() if routing.goes_live(None, v, limit)}
    assert want_live == {k for k, v in due.items() if v < limit}
    docs = [{"doc_key": k} for k in due]
    with rt.engine.connect() as conn:
        claimed = live_store.claim(conn, limit, 100, now)
        intent = intents.create_intent(conn, "t", now + timedelta(minutes=5), now)
        q.claim(conn, intent, 100, now, live_cutoff=limit)
        batch = {r.doc_key for r in q.iter_claimed(conn, intent)}
        conn.rollback()
    assert {c.row.doc_key for c in claimed} == want_live
    assert batch == {d["doc_key"] for d in docs} - want_live


@given(
    minutes=st.lists(st.integers(min_value=-26 * 60, max_value=26 * 60), min_size=1, max_size=5),
    offsets=st.lists(st.integers(min_value=-12 * 60, max_value=14 * 60), min_size=5, max_size=5),
    style=st.sampled_from(["T-Z", "T-offset", "space-offset", "canonical-ms"]),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_due_by_written_by_hand_in_any_iso_form_is_routed_by_its_instant(
    runtime: Harness, minutes: list[int], offsets: list[int], style: str
) -> None:
    """Plain SQL may write `due_by` as any ISO 8601 text: `T` or space, `Z` or an offset. SQLite keeps the
    text and once compared it as text, so `'2026-12-04 01:00:00+02:00'` (before the cutoff) went to the
    batch and `'2026-12-03 22:00:00-03:00'` (after it) went live. Both claims must follow the instant."""
    rt = runtime
    now = datetime.fromisoformat("2026-12-02T13:00:00+00:00")
    limit = routing.cutoff(rt.config, now)
    with rt.engine.begin() as conn:
        conn.execute(text("DELETE FROM etl_queue"))
        due: dict[str, datetime] = {}
        for i, m in enumerate(minutes):
            instant = limit + timedelta(minutes=m, seconds=i)
            tz = timezone(timedelta(minutes=offsets[i]))
            local = instant.astimezone(tz)
            written = {
                "T-Z": instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "T-offset": local.isoformat(),
                "space-offset": local.isoformat(sep=" "),
                "canonical-ms": instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23],
            }[style]
            conn.execute(
                text("INSERT INTO etl_queue (doc_key, body, due_by) VALUES (:k, 'b', :d)"),
                {"k": f"d{i}", "d": written},
            )
            due[f"d{i}"] = instant
        if rt.engine.dialect.name == "sqlite":  # PostgreSQL refuses such text at INSERT
            conn.execute(text("INSERT INTO etl_queue (doc_key, body, due_by) VALUES ('junk', 'b', 'soon')"))
    want_live = {k for k, v in due.items() if v < limit}
    with rt.engine.connect() as conn:
        claimed = live_store.claim(conn, limit, 100, now)
        intent = intents.create_intent(conn, "t", now + timedelta(minutes=5), now)
        q.claim(conn, intent, 100, now, live_cutoff=limit)
        batch = {r.doc_key for r in q.iter_claimed(conn, intent)}
        conn.rollback()
    assert {c.row.doc_key for c in claimed} == want_live
    assert batch == (set(due) - want_live) | ({"junk"} if rt.engine.dialect.name == "sqlite" else set())


def test_tasks_that_forbid_the_live_path_and_bad_input_never_reach_the_api(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    rt = make_runtime(extra=FAST + "\n[tasks.quiet]\nmodel = 'claude-haiku-4-5'\nlive = false\n")
    insert_docs(
        rt,
        [
            {"doc_key": "forbidden", "body": "x", "task": "quiet", "mode": "live"},
            {"doc_key": "empty", "body": "   ", "mode": "live"},
            {"doc_key": "no-task", "body": "x", "task": "nope", "mode": "live"},
            {"doc_key": "bad-model", "body": "x", "task": "classify", "mode": "live"},  # lacks metadata
        ],
    )
    out = live.run(rt.config, rt.db, rt.api, rt.clock, once=True)
    rows = queue_rows(rt)
    assert rows["forbidden"]["status"] == "queued"
    assert "forbids the live path" in rows["forbidden"]["reason"]
    assert {rows[k]["status"] for k in ("empty", "no-task", "bad-model")} == {"rejected"}
    assert "empty" in rows["empty"]["reason"] and "does not exist" in rows["no-task"]["reason"]
    assert (out.fell_back, out.rejected, out.calls) == (1, 3, 0)
    assert control.ledger()["live"]["calls"] == 0
    # The fallen-back row is the batch's now.
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 1


def test_past_the_daily_spend_cap_urgent_rows_fall_back_to_the_batch_and_the_report_says_so(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    # A call's upper bound (10 input tokens and 200 output tokens of haiku: $0.00101) is counted before it
    # leaves: the first call fits under $0.00103; the second, on top of the first's $0.000045, would not.
    rt = make_runtime(extra=FAST + "daily_spend_cap_usd = 0.00103\nconcurrency = 1\n")
    insert_docs(rt, [{"doc_key": f"u{i}", "body": f"urgent {i}", "mode": "live"} for i in range(3)])
    out = live.run(rt.config, rt.db, rt.api, rt.clock, once=True)
    assert (out.succeeded, out.fell_back) == (1, 2)
    rows = queue_rows(rt)
    assert sorted(r["status"] for r in rows.values()) == ["done", "queued", "queued"]
    assert all("spend cap" in r["reason"] for r in rows.values() if r["status"] == "queued")
    assert all("of $0.00103," in r["reason"] for r in rows.values() if r["status"] == "queued")
    assert control.ledger()["live"]["calls"] == 1
    body = report.build(rt.config, rt.db, clock(), None)
    assert body["paths"]["live"]["fell_back"] == {"daily live spend cap reached": 2}
    assert "daily live spend cap reached" in report.render(body)


def test_permanent_api_errors_are_dead_with_the_reason_and_529_bursts_are_waited_out(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    rt = make_runtime(extra=FAST + "concurrency = 1\n")
    control.set_faults(
        [
            {"endpoint": "messages", "action": "status", "status": 529, "times": 3, "retry_after": 0},
        ]
    )
    insert_docs(rt, [{"doc_key": "ok", "body": "fine", "mode": "live"}])
    out = live.run(rt.config, rt.db, rt.api, rt.clock, once=True)
    assert out.succeeded == 1 and out.calls == 4
    control.set_faults([{"endpoint": "messages", "action": "status", "status": 400, "message": "bad prompt"}])
    insert_docs(rt, [{"doc_key": "refused", "body": "fine too", "mode": "live"}])
    out = live.run(rt.config, rt.db, rt.api, rt.clock, once=True)
    rows = queue_rows(rt)
    assert rows["refused"]["status"] == "dead" and "bad prompt" in rows["refused"]["reason"]
    assert rows["refused"]["attempts"] == 1 and out.calls == 1
    assert control.ledger()["live"]["calls"] == 1  # only the one that succeeded was billed


def test_the_api_rate_limits_are_honoured_by_waiting_for_the_window(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    """The emulator allows 2 requests a minute; the worker is told nothing in advance, gets 429 with
    retry-after and the ratelimit headers, and waits (on the shared clock the test moves) before calling
    again: every row done, each billed once, and never more than 2 calls admitted per minute."""
    rt = make_runtime(extra=FAST + "concurrency = 3\n")
    control.set_live(requests_per_minute=2)
    insert_docs(rt, [{"doc_key": f"u{i}", "body": f"urgent {i}", "mode": "live"} for i in range(5)])
    worker = live.LiveWorker(Settings(rt.config), rt.db, rt.api, rt.clock)
    runner = threading.Thread(target=worker.run, kwargs={"once": True})
    runner.start()
    for _ in range(600):  # 120 s at most: a loaded CI machine, not the pacing, sets the pace
        runner.join(0.2)
        if not runner.is_alive():
            break
        if worker.pacer.not_before is not None and worker.pacer.not_before > clock():
            clock.advance(61)
    assert not runner.is_alive()
    assert worker.outcome.succeeded == 5
    ledger = control.ledger()["live"]
    assert ledger["calls"] == 5 and set(ledger["billed"].values()) == {1}
    assert ledger["rate_limited"] >= 1
    assert {r["status"] for r in queue_rows(rt).values()} == {"done"}


def test_the_worker_never_exceeds_its_own_requests_per_minute(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(extra=FAST + "concurrency = 4\nrequests_per_minute = 3\n")
    control.set_live(requests_per_minute=3)  # the API would refuse a fourth call within the minute
    insert_docs(rt, [{"doc_key": f"u{i}", "body": f"urgent {i}", "mode": "live"} for i in range(7)])
    worker = live.LiveWorker(Settings(rt.config), rt.db, rt.api, rt.clock)
    runner = threading.Thread(target=worker.run, kwargs={"once": True})
    runner.start()
    for _ in range(600):  # 120 s at most: a loaded CI machine, not the pacing, sets the pace
        runner.join(0.2)
        if not runner.is_alive():
            break
        if len(worker.pacer.sent) >= 3:
            clock.advance(61)
    assert not runner.is_alive()
    assert worker.outcome.succeeded == 7
    assert control.ledger()["live"]["rate_limited"] == 0


def test_status_check_names_stuck_live_calls_and_urgent_rows_nobody_takes(
    make_runtime: Callable[..., Harness], clock: SharedClock
) -> None:
    from etl.status import status

    rt = make_runtime(extra=FAST)
    insert_docs(rt, [{"doc_key": "waiting", "body": "x", "mode": "live"}])
    assert status(rt.config, rt.db, rt.owner, rt.clock())[1] is True  # just inserted: not a problem yet
    with rt.engine.begin() as conn:
        live_store.claim(conn, routing.cutoff(rt.config, clock()), 1, clock())
    insert_docs(rt, [{"doc_key": "nobody", "body": "y", "mode": "live"}])
    clock.advance(3600)
    _, healthy, problems = status(rt.config, rt.db, rt.owner, rt.clock())
    assert not healthy
    assert any("not renewed" in p for p in problems)
    assert any("is `etl run` or `etl live` running?" in p for p in problems)
    live.run(rt.config, rt.db, rt.api, rt.clock, once=True)  # takes the stuck call back and answers both
    assert {r["status"] for r in queue_rows(rt).values()} == {"done"}
    assert status(rt.config, rt.db, rt.owner, rt.clock())[1] is True


def test_enqueue_files_carry_due_by_and_mode_and_refuse_bad_ones(
    runtime: Harness, clock: SharedClock, tmp_path: Any
) -> None:
    from etl.enqueue import InputError, enqueue_file

    now = clock()
    good = tmp_path / "docs.jsonl"
    good.write_text(
        f'{{"doc_key": "a", "body": "x", "due_by": "{(now + timedelta(minutes=5)).isoformat()}"}}\n'
        '{"doc_key": "b", "body": "y", "mode": "live"}\n'
        '{"doc_key": "c", "body": "z"}\n'
    )
    assert enqueue_file(runtime.config, runtime.db, str(good), fmt=None, default_task=None) == 3
    with runtime.engine.connect() as conn:
        rows = {
            r.doc_key: r for r in conn.execute(text("SELECT doc_key, due_by, mode, metadata FROM etl_queue"))
        }
    assert rows["b"].mode == "live" and rows["c"].mode is None and rows["a"].metadata is None
    assert (
        live.run(runtime.config, runtime.db, runtime.api, runtime.clock, once=True).succeeded == 2
    )  # a (due in 5 minutes) and b
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc_key": "d", "body": "x", "due_by": "tomorrow"}\n')
    with pytest.raises(InputError, match="line 1: due_by 'tomorrow' is not an ISO 8601 time"):
        enqueue_file(runtime.config, runtime.db, str(bad), fmt=None, default_task=None)


def test_seams_with_the_other_commands_leave_the_live_path_its_rows_and_its_stuck_calls_seen(
    make_runtime: Callable[..., Harness], clock: SharedClock
) -> None:
    """Where the live path meets the rest: `etl estimate` prices only what the batch would send (not
    the rows the live path takes), `etl retry` gives a row its live calls back, and a call left
    `calling` by a crash is named by `status --check` even after the live path was switched off."""
    from etl import estimate
    from etl.status import status

    rt = make_runtime(extra=FAST)
    insert_docs(rt, [{"doc_key": f"night-{i}", "body": f"ordinary {i}"} for i in range(3)])
    insert_docs(rt, [{"doc_key": "urgent", "body": "now please", "mode": "live"}])
    est = estimate.run(rt.config, rt.db, rt.api, rt.clock(), estimate.Selection())
    assert est.documents == 3

    with rt.engine.begin() as conn:
        conn.execute(text("UPDATE etl_queue SET status = 'dead', live_calls = 3 WHERE doc_key = 'urgent'"))
        n = q.retry(conn, text("doc_key = 'urgent'"), clock())
    assert n == 1
    with rt.engine.connect() as conn:
        calls = conn.execute(text("SELECT live_calls FROM etl_queue WHERE doc_key = 'urgent'")).scalar_one()
    assert calls == 0

    with rt.engine.begin() as conn:
        assert len(live_store.claim(conn, routing.cutoff(rt.config, clock()), 1, clock())) == 1
    clock.advance(3600)
    off = make_runtime(extra="\n[live]\nenabled = false\n")
    _, healthy, problems = status(off.config, off.db, off.owner, off.clock())
    assert not healthy
    assert any("not renewed" in p and "nothing takes them back" in p for p in problems)
