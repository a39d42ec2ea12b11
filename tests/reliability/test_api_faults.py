"""API faults: each one injected by the emulator into real `etl` processes, then a restart to completion.

Creates are never retried blindly: a 429 gives the rows back untouched, an ambiguous answer (timeout, reset,
5xx, 529) leaves an `unknown` intent that is adopted if the API has the batch or released at no cost if
not. Results streams that end short, break or stall are retried and never mark a batch collected.
Systemic failures (spend limit, authentication, billing) pause submission without moving any attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability.harness import PROCESSING_SECONDS, Scenario

DOCS = 12
DAY = 86400


def _fired(sc: Scenario) -> bool:
    """Every injected rule with a `times` budget was used up."""
    return all(r.get("remaining") in (0, None) for r in sc.control.faults()["rules"])


def _submit_then_end(sc: Scenario) -> None:
    assert sc.run("submit").returncode == 0
    sc.clock.advance(PROCESSING_SECONDS + 60)


def _rows(sc: Scenario) -> list[dict[str, Any]]:
    from sqlalchemy import text

    with sc.engine.connect() as conn:
        return [
            dict(r._mapping) for r in conn.execute(text("SELECT status, attempts, reason FROM etl_queue"))
        ]


def create_429(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(
        rules=[{"endpoint": "create", "action": "status", "status": 429, "retry_after": 30, "times": 1}]
    )
    r = sc.run("submit")
    rows = _rows(sc)
    ok = r.returncode == 3 and "rate limited" in r.stdout and sc.control.ledger()["batches_created"] == 0
    ok = ok and all(x["status"] == "queued" and x["attempts"] == 0 for x in rows)
    ok = ok and any((x["reason"] or "").startswith("not sent yet") for x in rows)
    return ok, f"create answered 429 retry-after 30: rc {r.returncode}, rows back untouched, nothing created"


def read_429(sc: Scenario) -> tuple[bool, str]:
    _submit_then_end(sc)
    sc.control.set_faults(
        rules=[{"endpoint": "retrieve", "action": "status", "status": 429, "retry_after": 0.1, "times": 2}]
    )
    r = sc.run("collect", "--no-report")
    return r.returncode == 0 and _fired(sc), "two 429s on retrieve absorbed by the SDK's read retries"


def create_529_burst(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 529, "times": 3}])
    runs = [sc.run("submit") for _ in range(2)]
    unknown = sc.intent_statuses().get("unknown", 0)
    ok = all(r.returncode == 3 for r in runs) and unknown == 2 and sc.control.ledger()["batches_created"] == 0
    return (
        ok,
        f"529 on create x2 runs: {unknown} unknown intents, never re-sent, released after the grace period",
    )


def read_529_burst(sc: Scenario) -> tuple[bool, str]:
    _submit_then_end(sc)
    sc.control.set_faults(rules=[{"endpoint": "retrieve", "action": "status", "status": 529, "times": 4}])
    r = sc.run("collect", "--no-report")
    return r.returncode == 3 and _fired(
        sc
    ), "a burst of 529s on retrieve: run reports the problem, next run collects"


def create_500_no_batch(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 500, "times": 1}])
    r = sc.run("submit")
    ok = (
        r.returncode == 3
        and sc.intent_statuses().get("unknown") == 1
        and sc.control.ledger()["batches_created"] == 0
    )
    return ok, "create answered 500 without making a batch: intent unknown, released at no cost"


def create_reset_batch_made(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    r = sc.run("submit")
    ok = (
        r.returncode == 3
        and sc.intent_statuses().get("unknown") == 1
        and sc.control.ledger()["batches_created"] == 1
    )
    sc.run("reconcile")  # not ended yet: its custom_ids cannot be read, so the intent waits
    waited = sc.intent_statuses().get("unknown") == 1
    sc.clock.advance(PROCESSING_SECONDS + 60)
    sc.run("reconcile")
    adopted = sc.count("SELECT count(*) FROM etl_batches WHERE adopted = 1")
    return (
        ok and waited and adopted == 1,
        "batch made, connection reset before the answer: intent adopted once its results prove it, not re-sent",
    )


def create_timeout_batch_made(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(
        rules=[{"endpoint": "create", "action": "ambiguous", "delay_seconds": 2, "times": 1}]
    )
    r = sc.run("submit")
    ok = r.returncode == 3 and sc.control.ledger()["batches_created"] == 1
    sc.clock.advance(PROCESSING_SECONDS + 60)
    sc.run("reconcile")
    adopted = sc.count("SELECT count(*) FROM etl_batches WHERE adopted = 1")
    return (
        ok and adopted == 1,
        "batch made, answer later than the create timeout: intent adopted once ended, not re-sent",
    )


def transient_404(sc: Scenario) -> tuple[bool, str]:
    _submit_then_end(sc)
    sc.control.set_faults(rules=[{"endpoint": "retrieve", "action": "not_found", "first_retrieves": 1}])
    r = sc.run("collect", "--no-report")
    sc.control.clear_faults()
    return (
        r.returncode == 3 and "404" in r.stderr,
        "retrieve 404 for an existing batch: reported, next run collects",
    )


def _stream(action: str, times: int) -> Callable[[Scenario], tuple[bool, str]]:
    def scenario(sc: Scenario) -> tuple[bool, str]:
        _submit_then_end(sc)
        rule: dict[str, Any] = {"endpoint": "results", "action": action, "after_lines": 2, "times": times}
        if action == "stall":
            rule["stall_seconds"] = 2
        sc.control.set_faults(rules=[rule])
        r = sc.run("collect", "--no-report")
        fired = _fired(sc)
        statuses = sc.intent_statuses()
        if times == 1:
            ok = r.returncode == 0 and statuses.get("collected") == 3
            return ok and fired, f"results {action} once: retried with backoff in the same run, all collected"
        ok = r.returncode == 3 and statuses.get("collected", 0) < 3 and statuses.get("ended", 0) >= 1
        return (
            ok and fired,
            f"results {action} on every try: batch left 'ended', not collected; next run completes",
        )

    return scenario


def spend_limit(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(rules=[{"endpoint": "create", "action": "spend_limit", "times": 1}])
    r = sc.run("submit")
    rows = _rows(sc)
    again = sc.run("submit")
    ok = (
        r.returncode == 75  # the same code as every later run until resume (issue 22, point 4)
        and "spend limit" in r.stdout
        and again.returncode == 75
        and "paused" in again.stderr
    )
    ok = ok and all(x["status"] == "queued" and x["attempts"] == 0 for x in rows)
    assert sc.run("resume").returncode == 0
    return (
        ok,
        "spend limit on create: paused with the reason, no attempt counted, next run refuses until resume",
    )


def auth_error(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 401, "times": 1}])
    r = sc.run("submit")
    paused = sc.run("status").stdout
    ok = r.returncode == 75 and "paused" in r.stdout and "submission paused" in paused
    ok = ok and all(x["attempts"] == 0 for x in _rows(sc))
    assert sc.run("resume").returncode == 0
    return ok, "401 on create: paused, reason in `etl status`, no attempt counted"


def billing_error_lines(sc: Scenario) -> tuple[bool, str]:
    sc.control.set_faults(outcomes=[{"custom_id": ".*", "outcome": "errored", "error_type": "billing_error"}])
    _submit_then_end(sc)
    sc.run("collect", "--no-report")
    sc.control.clear_faults()
    rows = _rows(sc)
    refused = sc.run("submit")
    ok = all(x["status"] == "queued" and x["attempts"] == 0 for x in rows) and refused.returncode == 75
    ok = ok and "billing_error" in refused.stderr
    assert sc.run("resume").returncode == 0
    return ok, "every line failed with billing_error: rows back with no attempt counted, submission paused"


def archived(sc: Scenario) -> tuple[bool, str]:
    _submit_then_end(sc)
    sc.clock.advance(30 * DAY)
    r = sc.run("collect", "--no-report")
    rows = _rows(sc)
    ok = sc.intent_statuses().get("archived") == 3 and all(
        x["status"] == "queued" and x["attempts"] == 0 and "archived" in (x["reason"] or "") for x in rows
    )
    return (
        ok,
        f"collected 30 days late: rc {r.returncode}, all rows re-queued with the reason, no attempt counted",
    )


CASES: dict[str, Callable[[Scenario], tuple[bool, str]]] = {
    "create 429 retry-after": create_429,
    "read 429 retry-after": read_429,
    "create 529 burst": create_529_burst,
    "retrieve 529 burst": read_529_burst,
    "create 500, no batch": create_500_no_batch,
    "create reset, batch made": create_reset_batch_made,
    "create timeout, batch made": create_timeout_batch_made,
    "retrieve transient 404": transient_404,
    **{f"results {a} once": _stream(a, 1) for a in ("truncate", "cut_line", "stream_reset", "stall")},
    **{f"results {a} always": _stream(a, 3) for a in ("truncate", "cut_line", "stream_reset", "stall")},
    "spend limit": spend_limit,
    "authentication error": auth_error,
    "billing error on every line": billing_error_lines,
}


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
@pytest.mark.parametrize("case", list(CASES))
def test_api_fault_then_restart_completes_with_every_invariant(
    case: str, db: str, make_scenario: Callable[..., Scenario]
) -> None:
    sc = make_scenario(f"api {case}", db)
    sc.insert_plain(DOCS)
    fault = CASES[case](sc)
    sc.control.clear_faults()
    sc.complete()
    sc.verdict(fault)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_archived_results_requeue_every_row_with_the_reason(
    db: str, make_scenario: Callable[..., Scenario]
) -> None:
    """Results vanish 29 days after creation: the rows go back to the queue, loudly (they will be paid again)."""
    sc = make_scenario("api archived results (30 days)", db)
    sc.insert_plain(DOCS)
    sc.verdict(archived(sc), final=False, allow_queued=True)
