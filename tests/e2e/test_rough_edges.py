"""Issue 22's rough edges on both databases, through the real SDK against the emulator."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal

from etl import estimate, live, pipeline, reconciler, report, status
from etl.emulator import EmulatorControl
from etl.store import batches as intents
from etl.store.schema import BatchStatus
from tests.conftest import SharedClock, insert_docs
from tests.harness import Harness

# -- 6. money: the live daily cap counts the calls in flight ------------------------------------------

ONE_TOKEN = """
[tasks.tiny]
model = "claude-haiku-4-5"
template = "{body}"
max_tokens = 1

[live]
backoff_seconds = 0.05
poll_seconds = 0.2
concurrency = 4
"""


def test_the_live_daily_cap_counts_calls_in_flight_and_is_never_crossed(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    """Eight rows at concurrency 4, each call at most (and, with max_tokens 1, exactly) $0.000011 (6 input
    tokens at $1/M, 1 output token at $5/M); a cap of just over two calls. Checked against settled spend
    alone, the four first calls all passed at once (twice the cap); counted with the calls in flight,
    exactly two are made."""
    rt = make_runtime(extra=ONE_TOKEN.replace("[live]", "[live]\ndaily_spend_cap_usd = 0.0000225"))
    control.set_live(latency_seconds=0.5)
    rows = [
        {"doc_key": f"u{i}", "body": f"urgent document number {i}", "task": "tiny", "mode": "live"}
        for i in range(8)
    ]
    insert_docs(rt, rows)
    out = live.run(rt.config, rt.db, rt.api, rt.clock, once=True)
    ledger = control.ledger()["live"]
    assert ledger["calls"] == 2 and (out.succeeded, out.fell_back) == (2, 6), (ledger, out)
    assert Decimal(str(ledger["standard_cost_usd"])) <= Decimal("0.0000225")
    assert all("of $0.0000225," in r for r in out.reasons), out.reasons


# -- 6. money: every amount in JSON is a decimal string ---------------------------------------------


def amounts(value: object, path: str = "") -> Iterator[tuple[str, object]]:
    """Every (path, value) under a key that names money (`..._usd`), however deep."""
    if isinstance(value, dict):
        for key, inner in value.items():
            where = f"{path}.{key}"
            if str(key).endswith("_usd") and not isinstance(inner, dict):
                yield where, inner
            elif str(key).endswith("_usd"):
                yield from ((f"{where}.{k}", v) for k, v in inner.items())
            else:
                yield from amounts(inner, where)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from amounts(inner, f"{path}[{i}]")


def test_every_amount_of_report_status_and_estimate_json_is_a_decimal_string(
    make_runtime: Callable[..., Harness], clock: SharedClock
) -> None:
    rt = make_runtime(extra=ONE_TOKEN)
    insert_docs(rt, [{"doc_key": "now", "body": "urgent", "task": "tiny", "mode": "live"}])
    insert_docs(rt, [{"doc_key": f"b{i}", "body": f"nightly {i}", "task": "default"} for i in range(3)])
    assert live.run(rt.config, rt.db, rt.api, rt.clock, once=True).succeeded == 1
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 3
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    insert_docs(rt, [{"doc_key": "later", "body": "queued", "task": "default"}])
    info, _, _ = status.status(rt.config, rt.db, rt.owner, rt.clock())
    bodies = {
        "report": json.loads(json.dumps(report.build(rt.config, rt.db, clock(), None), default=str)),
        "status": json.loads(json.dumps(info, default=str)),
        "estimate": estimate.run(rt.config, rt.db, rt.api, rt.clock(), estimate.Selection()).to_json(),
    }
    seen = 0
    for name, body in bodies.items():
        for where, value in amounts(body):
            assert isinstance(value, str), f"{name}{where} is {value!r}, not a decimal string"
            Decimal(value)
            seen += 1
    assert seen > 10
    assert (
        bodies["report"]["paths"]["live"]["cost_usd"] == "0.0000070000"
    )  # 2 input tokens at $1/M, 1 output at $5/M


# -- 7. the report: whole reasons, real tasks -------------------------------------------------------


def test_the_report_counts_failures_by_their_whole_reason_and_every_row_under_its_task(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime()
    insert_docs(rt, [{"doc_key": f"r{i}", "body": f"released {i}", "task": "default"} for i in range(2)])
    control.set_faults(rules=[{"endpoint": "create", "action": "reset", "times": 1}])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    with rt.engine.connect() as conn:
        (intent,) = intents.with_status(conn, BatchStatus.UNKNOWN)
    reconciler.release_by_operator(rt.db, rt.clock(), intent.id)
    control.set_faults(
        outcomes=[
            {
                "custom_id": ".*",
                "outcome": "errored",
                "error_type": "invalid_request_error",
                "message": "prompt is too long",
            }
        ]
    )
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 2
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    body = report.build(rt.config, rt.db, clock(), None)
    assert set(body["tasks"]) == {"default"}, body["tasks"]  # no "(all)" beside the real tasks
    assert body["tasks"]["default"]["released"] == 2
    failed = [k for k in body["failures"] if not k.startswith("released")]
    assert failed and all("invalid_request_error" in k and "prompt is too long" in k for k in failed), failed
