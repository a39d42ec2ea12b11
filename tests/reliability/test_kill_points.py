"""Kill points: every named failpoint x SQLite and PostgreSQL x (killed once, killed twice in a row), then a
restart without the failpoint runs to completion and the checker judges the result."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from etl.failpoints import POINTS
from tests.reliability.harness import PROCESSING_SECONDS, Scenario

DOCS = 12  # 5 per batch: three batches, so a second run always has a next batch to die on
OVERLOADED = r"q\d*[27](_.*)?"  # a fifth of the documents fail once with a transient error


def _kill_submit(sc: Scenario, point: str, times: int) -> tuple[bool, str]:
    if point == "submit.during_create":
        sc.control.set_faults(
            rules=[{"endpoint": "create", "action": "ambiguous", "delay_seconds": 2, "times": times}]
        )
    runs = [sc.run("submit", failpoints=f"{point}=kill") for _ in range(times)]
    fired = all(r.killed for r in runs)
    detail = f"{times} submit run(s) died with SIGKILL at {point}: {[r.returncode for r in runs]}"
    if point == "submit.during_create":
        created = sc.control.ledger()["batches_created"]
        fired = fired and created == times
        detail += f"; the API created {created} batch(es) whose response nobody read"
    return fired, detail


def _kill_collect(sc: Scenario, point: str, times: int) -> tuple[bool, str]:
    if point == "requeue.after_requeue":
        sc.control.set_faults(
            outcomes=[{"custom_id": OVERLOADED, "outcome": "errored", "error_type": "overloaded_error"}]
        )
    assert sc.run("submit").returncode == 0
    sc.clock.advance(PROCESSING_SECONDS + 60)
    runs = [sc.run("collect", "--no-report", failpoints=f"{point}=kill") for _ in range(times)]
    served = sum(o["hits"] for o in sc.control.faults()["outcomes"])
    sc.control.clear_faults()
    fired = all(r.killed for r in runs)
    detail = f"{times} collect run(s) died with SIGKILL at {point}: {[r.returncode for r in runs]}"
    if point == "requeue.after_requeue":  # the re-queue happens only if the overloaded results were served
        fired = fired and served > 0
        detail += f"; {served} overloaded result(s) served"
    return fired, detail


def _kill_reconcile(sc: Scenario, point: str, times: int) -> tuple[bool, str]:
    # Two unknown intents: ambiguous creates (made, answer lost) or 500s (never made) for release.
    if point == "reconcile.after_release":
        rule = {"endpoint": "create", "action": "status", "status": 500, "times": 2}
    else:
        rule = {"endpoint": "create", "action": "ambiguous", "delay_seconds": 2, "times": 2}
    sc.control.set_faults(rules=[rule], list_delay_seconds=30)
    for _ in range(2):
        assert sc.run("submit").returncode == 3
    sc.control.clear_faults()
    assert sc.intent_statuses().get("unknown") == 2
    # Past the list delay and the processing time: two look-alike batches (same size, same minute) are only
    # adopted once they have ended and their custom_ids say which intent sent each.
    sc.clock.advance(
        PROCESSING_SECONDS + 40
        if point != "reconcile.after_release"
        else sc.settings["reconcile_grace_seconds"] + 60
    )
    runs = [sc.run("reconcile", failpoints=f"{point}=kill") for _ in range(times)]
    fired = all(r.killed for r in runs)
    return fired, f"{times} reconcile run(s) died with SIGKILL at {point}: {[r.returncode for r in runs]}"


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
@pytest.mark.parametrize("point", POINTS)
def test_killed_at_every_boundary_the_restart_completes_with_every_invariant(
    point: str, db: str, times: int, make_scenario: Callable[..., Scenario]
) -> None:
    sc = make_scenario(f"kill {point} x{times}", db, separate_warehouse=point == "collect.after_warehouse")
    sc.insert_plain(DOCS)
    if point.startswith("submit."):
        fault = _kill_submit(sc, point, times)
    elif point.startswith("reconcile."):
        fault = _kill_reconcile(sc, point, times)
    else:
        fault = _kill_collect(sc, point, times)
    sc.complete()
    sc.verdict(fault)


def test_the_same_kill_through_a_cold_python_m_etl_cli_process(
    make_scenario: Callable[..., Scenario],
) -> None:
    """The launcher forks pre-warmed processes; this proves a cold `python -m etl.cli` dies and recovers alike."""
    from tests.conftest import run_etl

    sc = make_scenario("kill submit.after_create, cold process", "sqlite")
    sc.insert_plain(DOCS)
    killed = run_etl(["submit"], sc.env("submit.after_create=kill"))
    assert killed.returncode == -9, killed.stderr
    sc.clock.advance(sc.settings["claim_lease_seconds"] + sc.settings["reconcile_grace_seconds"] + 60)
    assert run_etl(["submit"], sc.env()).returncode == 0
    sc.complete()
    sc.verdict(
        (killed.returncode == -9 and sc.control.ledger()["batches_created"] == 3, "cold process SIGKILLed")
    )
