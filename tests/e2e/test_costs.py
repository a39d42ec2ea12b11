"""Costs end to end, on SQLite and PostgreSQL against the emulator: the estimate, the nightly cap, and the
report's money against the emulator's ledger."""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from etl import budget, estimate, pipeline, report
from etl.emulator import EmulatorControl, EmulatorServer
from etl.store import spend
from tests.conftest import API_KEY, SharedClock, insert_docs, queue_rows, run_etl
from tests.harness import Harness

CACHED_TASK = """
[tasks.cached]
model = "claude-haiku-4-5"
system = "You summarise shipping documents for the finance team. Keep the figures exact. {rules}"
template = "Summarise:\\n{body}"
max_tokens = 150
cache_system = true
"""
# A system prompt long enough that its cache write/read tokens are plainly visible in the ledger.
CACHED_TASK = CACHED_TASK.replace('exact. " ', "exact. " + "Never guess a number. " * 20 + '"')


def snapshot(rt: Harness) -> list[tuple[Any, ...]]:
    with rt.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text("SELECT id, status, batch_ref, attempts, reason, updated_at FROM etl_queue ORDER BY id")
            )
        ]


def docs(n: int, task: str = "default", prefix: str = "d") -> list[dict[str, Any]]:
    return [
        {"doc_key": f"{prefix}{i}", "body": f"Invoice {i:04d} for crates of apples", "task": task}
        for i in range(n)
    ]


def reserved_tonight(rt: Harness) -> Decimal:
    with rt.engine.connect() as conn:
        night = budget.night_of(rt.clock(), rt.config.schedule.zone)
        return sum(spend.reserved(conn, night).values(), Decimal(0))


def test_estimate_claims_nothing_sends_nothing_and_prices_what_the_submit_then_sends(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    rt = make_runtime(extra=CACHED_TASK, submit={"max_requests_per_batch": 4})
    older = {"doc_key": "d0", "body": "an older version of d0, superseded by the submit, never sent"}
    insert_docs(rt, [older, *docs(10), *docs(3, "cached", "c"), {"doc_key": "bad", "body": " "}])
    before = snapshot(rt)

    est = estimate.run(rt.config, rt.db, rt.api, rt.clock(), estimate.Selection())
    assert snapshot(rt) == before
    assert control.ledger()["batches_created"] == 0
    by_task = {t.task: t for t in est.tasks}
    assert (est.documents, est.rejected, est.batches) == (13, 1, 4)
    assert by_task["default"].documents == 10 and by_task["default"].rejected == 1
    assert by_task["default"].max_output_tokens == 10 * 200
    cached = by_task["cached"]
    # ids 12-14: two of them in the third batch, one in the fourth: a write in each, one read
    assert cached.batches == 2 and cached.cache_write_tokens == 2 * cached.cache_read_tokens > 0
    assert "nothing was claimed or sent" in estimate.render(est)

    # count_tokens on the whole queue (13 < the sample size): the local estimate is the emulator's count.
    counted = estimate.run(rt.config, rt.db, rt.api, rt.clock(), estimate.Selection(), count_tokens=True)
    assert counted.sampling is not None and counted.sampling.sampled == 13
    assert counted.sampling.local_error == 0.0 and counted.sampling.margin_tokens == 0
    assert snapshot(rt) == before and control.ledger()["batches_created"] == 0
    assert "off by +0.0%" in estimate.render(
        estimate.run(rt.config, rt.db, rt.api, rt.clock(), estimate.Selection())
    )

    only = estimate.run(rt.config, rt.db, rt.api, rt.clock(), estimate.Selection(task="cached"))
    assert [t.task for t in only.tasks] == ["cached"] and only.documents == 3

    # The submit's own estimate of each batch, summed, is the estimate printed before.
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.documents == 13
    with rt.engine.connect() as conn:
        estimated = conn.execute(text("SELECT estimated_usd FROM etl_spend")).scalars().all()
    total = sum((Decimal(v) for v in estimated), Decimal(0))
    if rt.engine.dialect.name == "sqlite":
        total = total.scaleb(-10)
    assert total == Decimal(est.cost_usd)


@pytest.mark.parametrize("fits", [3, 5])
def test_the_cap_holds_exactly_at_the_boundary(
    make_runtime: Callable[..., Harness], control: EmulatorControl, clock: SharedClock, fits: int
) -> None:
    """A cap of exactly `fits` documents' upper bound sends `fits`; one unit less sends one fewer."""
    probe = make_runtime(submit={"max_requests_per_batch": 2})
    insert_docs(probe, docs(8))
    per_doc = (
        Decimal(
            estimate.run(
                probe.config, probe.db, probe.api, probe.clock(), estimate.Selection()
            ).upper_bound_usd
        )
        / 8
    )
    cap = per_doc * fits
    rt = make_runtime(submit={"max_requests_per_batch": 2, "max_cost_usd_per_night": float(cap)})
    assert rt.config.submit.max_cost_usd_per_night == cap  # exact in the TOML float for these prices

    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.documents == fits and out.waiting > 0
    assert control.ledger()["requests_created"] == fits
    assert reserved_tonight(rt) == cap
    rows = queue_rows(rt).values()
    waiting = [r for r in rows if r["status"] == "queued"]
    assert len(waiting) == 8 - fits
    assert all(r["reason"].startswith(budget.BUDGET_REASON) for r in waiting)

    again = pipeline.submit(
        rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop
    )  # the same night: the cap is spent
    assert again.documents == 0 and control.ledger()["requests_created"] == fits
    body = report.build(rt.config, rt.db, rt.clock(), None)
    assert body["budget"]["reserved_usd"] == str(cap.quantize(Decimal("1e-10")))
    assert body["budget"]["waiting_documents"] == {"default": 8 - fits}
    assert "waiting for the budget: default" in report.render(body)

    clock.advance(24 * 3600)  # the next night has a budget of its own
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == min(
        fits, 8 - fits
    )


def test_one_unit_under_the_boundary_sends_one_document_fewer(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    probe = make_runtime()
    insert_docs(probe, docs(4))
    per_doc = (
        Decimal(
            estimate.run(
                probe.config, probe.db, probe.api, probe.clock(), estimate.Selection()
            ).upper_bound_usd
        )
        / 4
    )
    cap = per_doc * 3 - Decimal("1e-10")
    rt = make_runtime(submit={"max_cost_usd_per_night": float(cap)})
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 2
    assert control.ledger()["requests_created"] == 2


def test_a_task_cap_holds_its_task_back_and_lets_the_others_go(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    extra = CACHED_TASK + "max_cost_usd_per_night = 0.000001\n"
    rt = make_runtime(extra=extra, submit={"max_requests_per_batch": 3})
    insert_docs(rt, [{**d, "priority": 5} for d in docs(4, "cached", "c")] + docs(5))
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.documents == 5  # every `default` document, none of `cached` (one costs more than its cap)
    statuses = {k: r["status"] for k, r in queue_rows(rt).items()}
    assert {statuses[f"c{i}"] for i in range(4)} == {"queued"}
    assert control.ledger()["requests_created"] == 5


def test_two_submitters_at_once_never_cross_the_cap(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    probe = make_runtime()
    insert_docs(probe, docs(12))
    per_doc = (
        Decimal(
            estimate.run(
                probe.config, probe.db, probe.api, probe.clock(), estimate.Selection()
            ).upper_bound_usd
        )
        / 12
    )
    cap = per_doc * 5
    settings = {"max_requests_per_batch": 1, "max_cost_usd_per_night": float(cap)}
    runtimes = [make_runtime(submit=settings) for _ in range(2)]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def submit(rt: Harness) -> None:
        try:
            start.wait()
            pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(rt,)) for rt in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert control.ledger()["requests_created"] == 5
    assert reserved_tonight(runtimes[0]) == cap


@pytest.mark.parametrize("point", ["submit.after_build", "submit.after_create"])
def test_a_submit_killed_after_reserving_never_lets_the_cap_be_crossed(
    db_url: str,
    emulator: EmulatorServer,
    control: EmulatorControl,
    clock: SharedClock,
    make_runtime: Callable[..., Harness],
    config_file: Callable[..., Path],
    point: str,
) -> None:
    """SIGKILL with a batch reserved but not sent (after_build) or sent but not recorded (after_create):
    the restart gives back only what never reached the API, and sends exactly up to the cap."""
    probe = make_runtime()
    insert_docs(probe, docs(9))
    per_doc = (
        Decimal(
            estimate.run(
                probe.config, probe.db, probe.api, probe.clock(), estimate.Selection()
            ).upper_bound_usd
        )
        / 9
    )
    cap = per_doc * 6
    settings = {"max_requests_per_batch": 2, "max_cost_usd_per_night": float(cap), "claim_lease_seconds": 60}
    env = {
        "ETL_CONFIG": str(config_file("", settings)),
        "ETL_DATABASE_URL": db_url,
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
    }
    killed = run_etl(["submit"], {**env, **clock.env, "ETL_FAILPOINTS": f"{point}=kill@2"})
    assert killed.returncode == -9, killed.stderr
    clock.advance(60 + 600 + 60)  # the lease and the reconcile grace run out
    done = run_etl(["submit"], {**env, **clock.env})
    assert done.returncode == 0, done.stderr
    assert control.ledger()["requests_created"] == 6
    assert reserved_tonight(probe) == cap
    statuses = [r["status"] for r in queue_rows(probe).values()]
    assert statuses.count("queued") == 3


@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "cache"])
def test_the_reports_cost_is_the_ledgers_tokens_at_the_configured_prices(
    make_runtime: Callable[..., Harness], control: EmulatorControl, clock: SharedClock, caching: bool
) -> None:
    rt = make_runtime(extra=CACHED_TASK, submit={"max_requests_per_batch": 7})
    task = "cached" if caching else "default"
    insert_docs(rt, [{**d, "body": d["body"] + " more" * i} for i, d in enumerate(docs(20, task))])
    pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    clock.advance(3600)
    assert pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).succeeded == 20
    body = report.build(rt.config, rt.db, rt.clock(), None)
    ledger = control.ledger()
    if caching:
        assert ledger["cache_creation_input_tokens"] > 0 and ledger["cache_read_input_tokens"] > 0
    # Haiku: $1 in, $5 out per million; 1 h cache writes 2x input, reads 0.1x; batch half of standard.
    standard = (
        Decimal(ledger["input_tokens"])
        + 5 * Decimal(ledger["output_tokens"])
        + 2 * Decimal(ledger["cache_creation_input_tokens"])
        + Decimal("0.1") * Decimal(ledger["cache_read_input_tokens"])
    ) / 1_000_000
    money = body["tokens_and_cost"]
    cent = Decimal("0.01")
    assert Decimal(money["standard_cost_usd"]).quantize(cent) == standard.quantize(cent)
    assert Decimal(money["cost_usd"]) == standard / 2  # exact, not only to the cent
    with rt.warehouse.connect() as conn:
        rows = conn.execute(text("SELECT cost_usd FROM etl_results")).scalars().all()
    as_stored = sum((Decimal(v) for v in rows), Decimal(0))
    if rt.engine.dialect.name == "sqlite":
        as_stored = as_stored.scaleb(-10)  # integer units of 10**-10 USD
    assert as_stored == Decimal(money["cost_usd"])
    per_task = body["costs"][task]
    assert per_task["cost_usd"] == money["cost_usd"]
    assert 0 < Decimal(per_task["accuracy"]) <= 1  # charged / estimated: the estimate is an upper bound
    assert "accuracy" in report.render(body)


def test_a_measured_shortfall_of_the_local_estimate_raises_what_the_cap_reserves(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    """count_tokens once found 1.5x the local estimate: the cap then reserves input tokens x 1.5, and
    `etl estimate` says so before the submit does it."""
    import json

    from etl.store import state

    probe = make_runtime()
    insert_docs(probe, [{"doc_key": f"b{i}", "body": "word " * 400} for i in range(6)])
    plain_bound = Decimal(
        estimate.run(probe.config, probe.db, probe.api, probe.clock(), estimate.Selection()).upper_bound_usd
    )
    with probe.engine.begin() as conn:
        state.set_value(
            conn,
            budget.CALIBRATION_KEY,
            json.dumps({"at": "x", "sampled": 9, "local_error": -0.3333, "ratio": 1.5}),
            probe.clock(),
        )
    est = estimate.run(probe.config, probe.db, probe.api, probe.clock(), estimate.Selection())
    assert Decimal(est.upper_bound_usd) > plain_bound
    assert "off by -33.3%" in estimate.render(est)
    cap = plain_bound / 6 * 4  # four documents by the local estimate alone
    rt = make_runtime(submit={"max_cost_usd_per_night": float(cap)})
    capped = estimate.run(rt.config, rt.db, rt.api, rt.clock(), estimate.Selection())
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.documents == capped.within_cap < 4
    assert control.ledger()["requests_created"] == out.documents
    assert reserved_tonight(rt) <= cap


def test_two_etl_submit_processes_at_once_never_cross_the_cap(
    db_url: str,
    emulator: EmulatorServer,
    control: EmulatorControl,
    make_runtime: Callable[..., Harness],
    config_file: Callable[..., Path],
) -> None:
    """The same as with two threads, with two real `etl submit` processes racing for the budget."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    probe = make_runtime()
    insert_docs(probe, docs(12))
    per_doc = (
        Decimal(
            estimate.run(
                probe.config, probe.db, probe.api, probe.clock(), estimate.Selection()
            ).upper_bound_usd
        )
        / 12
    )
    cap = per_doc * 5
    settings = {"max_requests_per_batch": 1, "max_cost_usd_per_night": float(cap)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
    env.update(
        {
            "ETL_CONFIG": str(config_file("", settings)),
            "ETL_DATABASE_URL": db_url,
            "ANTHROPIC_BASE_URL": emulator.base_url,
            "ANTHROPIC_API_KEY": API_KEY,
        }
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "etl.cli", "submit"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert control.ledger()["requests_created"] == 5
    assert reserved_tonight(probe) == cap
