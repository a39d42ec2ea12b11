"""The metrics page (etl/metrics.py) on SQLite and PostgreSQL, read after real runs against the emulator."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from etl import metrics, pipeline, report
from etl.settings import Settings
from etl.store.schema import DOC_STATUSES
from tests.conftest import SharedClock, insert_docs
from tests.harness import Harness, build

DAY = 86400
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(page: str) -> Samples:
    """Every sample of the page by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: Samples, name: str, **labels: str) -> float:
    return page[(name, tuple(sorted(labels.items())))]


def check_with_promtool(page: str) -> None:
    """`promtool check metrics` when Prometheus is installed (scripts/ensure-prometheus.sh)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_page_after_a_night_counts_documents_tokens_and_money_as_the_report_does(
    runtime: Harness, clock: SharedClock
) -> None:
    docs = [{"doc_key": f"d{i}", "body": f"Invoice {i} for {i * 3} crates"} for i in range(7)]
    docs.append({"doc_key": "c1", "body": "Revenue grew", "task": "classify", "metadata": '{"title": "Q3"}'})
    insert_docs(runtime, docs)
    insert_docs(runtime, [{"doc_key": "gone", "body": "given up"}])
    with runtime.engine.begin() as conn:  # rows are inserted queued only (migration 0008)
        conn.execute(text("UPDATE etl_queue SET status = 'dead', reason = 'test' WHERE doc_key = 'gone'"))
    pipeline.submit(runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop)
    clock.advance(3600)
    pipeline.collect(runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop)
    insert_docs(runtime, [{"doc_key": "next", "body": "for tomorrow"}])

    text_page = metrics.page(runtime.config, runtime.db, runtime.owner, runtime.clock)
    check_with_promtool(text_page)
    page = samples(text_page)
    body = report.build(runtime.config, runtime.db, clock(), None)

    assert value(page, "etl_queue_rows", status="done", task="default") == 7
    assert value(page, "etl_queue_rows", status="done", task="classify") == 1
    assert value(page, "etl_queue_rows", status="dead", task="default") == 1
    assert value(page, "etl_queue_rows", status="queued", task="default") == 1
    assert value(page, "etl_documents_total", task="default", event="succeeded") == 7
    assert value(page, "etl_documents_total", task="classify", event="submitted") == 1
    assert value(page, "etl_documents_total", task="default", event="live_billed_twice") == 0
    money = body["tokens_and_cost"]
    charged = sum(value(page, "etl_cost_usd_total", task=t, path="batch") for t in ("default", "classify"))
    standard = sum(
        value(page, "etl_standard_cost_usd_total", task=t, path="batch") for t in ("default", "classify")
    )
    assert charged == pytest.approx(float(Decimal(money["cost_usd"])), rel=1e-12, abs=0)
    assert standard == pytest.approx(float(Decimal(money["standard_cost_usd"])), rel=1e-12, abs=0)
    assert charged > 0 and standard == pytest.approx(2 * charged, rel=1e-9)
    tokens = sum(
        value(page, "etl_tokens_total", task=t, path="batch", type="input") for t in ("default", "classify")
    )
    assert tokens == money["input_tokens"] > 0
    assert value(page, "etl_batches", status="collected") == 1
    assert value(page, "etl_health_ok") == 1 and value(page, "etl_health_problems") == 0
    assert value(page, "etl_database_up") == 1
    # enqueued on the database's clock, an hour behind the tests' advanced one
    assert value(page, "etl_queue_oldest_queued_age_seconds") == pytest.approx(3600, abs=600)
    assert ("etl_batch_results_expiry_seconds", ()) not in page  # nothing open


def test_a_batch_aged_28_days_shows_its_expiry_within_a_day_and_fails_the_health_gauge(
    runtime: Harness, clock: SharedClock
) -> None:
    insert_docs(runtime, [{"doc_key": f"d{i}", "body": "x"} for i in range(3)])
    pipeline.submit(runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop)
    page = samples(metrics.page(runtime.config, runtime.db, runtime.owner, runtime.clock))
    assert value(page, "etl_batch_results_expiry_seconds") == pytest.approx(29 * DAY, abs=600)
    assert value(page, "etl_batches", status="submitted") == 1
    assert value(page, "etl_health_ok") == 1

    clock.advance(28 * DAY)  # the emulator's clock and ours: the batch is 28 days old, never collected
    page = samples(metrics.page(runtime.config, runtime.db, runtime.owner, runtime.clock))
    assert value(page, "etl_batch_results_expiry_seconds") == pytest.approx(DAY, abs=600)
    assert value(page, "etl_health_ok") == 0 and value(page, "etl_health_problems") >= 1


@given(
    rows=st.lists(
        st.tuples(st.sampled_from(DOC_STATUSES), st.sampled_from(["default", "classify", "unconfigured"])),
        max_size=40,
    )
)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_queue_rows_by_status_and_task_match_the_table_whatever_it_holds(
    runtime: Harness, rows: list[tuple[str, str]]
) -> None:
    with runtime.engine.begin() as conn:
        conn.execute(text("DELETE FROM etl_queue"))
        for i, (status, task) in enumerate(rows):
            conn.execute(  # inserted queued (migration 0008 refuses any other state), then moved
                text("INSERT INTO etl_queue (doc_key, body, task) VALUES (:k, 'b', :t)"),
                {"k": f"k{i}", "t": task},
            )
            conn.execute(
                text("UPDATE etl_queue SET status = :s WHERE doc_key = :k"), {"k": f"k{i}", "s": status}
            )
    page = samples(metrics.page(runtime.config, runtime.db, runtime.owner, runtime.clock))
    seen = {labels: v for (name, labels), v in page.items() if name == "etl_queue_rows"}
    expected = Counter(rows)
    for labels, n in seen.items():
        d = dict(labels)
        assert n == expected.get((d["status"], d["task"]), 0)
    for (status, task), n in expected.items():
        assert seen[(("status", status), ("task", task))] == n
    # every status of every configured task is there, 0 included, so a rule never sees a gap
    assert {dict(k)["status"] for k in seen if dict(k)["task"] == "default"} == set(DOC_STATUSES)


def test_a_batch_of_ours_that_nothing_explains_is_counted_until_acknowledged(runtime: Harness) -> None:
    """The reconciler keeps each batch of this installation that no intent could take (billed, never to
    be collected) under `unexplained_batch:<id>`; the page counts them and the health gauge fails."""
    from etl import reconciler
    from etl.clock import utcnow
    from etl.store import state

    assert (
        value(
            samples(metrics.page(runtime.config, runtime.db, runtime.owner, runtime.clock)),
            "etl_unexplained_batches",
        )
        == 0
    )
    with runtime.engine.begin() as conn:
        state.set_value(conn, f"{reconciler.UNEXPLAINED_KIND}:msgbatch_x", "50 request(s) billed", utcnow())
    page = samples(metrics.page(runtime.config, runtime.db, runtime.owner, runtime.clock))
    assert value(page, "etl_unexplained_batches") == 1 and value(page, "etl_health_ok") == 0
    with runtime.engine.begin() as conn:
        state.forget(conn, f"{reconciler.UNEXPLAINED_KIND}:msgbatch_x")
    assert (
        value(
            samples(metrics.page(runtime.config, runtime.db, runtime.owner, runtime.clock)),
            "etl_unexplained_batches",
        )
        == 0
    )


def test_an_unreachable_database_gives_database_up_0_not_an_error(runtime: Harness) -> None:
    url = "postgresql://nobody@127.0.0.1:1/none"
    rt = build(replace(runtime.config, database_url=url, warehouse_url=url))
    try:
        page = samples(metrics.page(rt.config, rt.db, rt.owner, rt.clock))
    finally:
        rt.close()
    assert value(page, "etl_database_up") == 0
    assert not any(name == "etl_health_ok" for name, _ in page)


def test_the_served_page_reuses_a_read_within_its_duty_cycle_and_says_how_old(runtime: Harness) -> None:
    """A scrape every second cannot make the page read the database all the time (etl.metrics.DUTY)."""
    from prometheus_client import CollectorRegistry, generate_latest

    def page_of(collector: metrics.DatabaseCollector) -> Samples:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(collector)
        return samples(generate_latest(reg).decode())

    throttled = metrics.DatabaseCollector(
        Settings(runtime.config), runtime.db, runtime.owner, runtime.clock, duty=1e-9
    )  # reuses any read for ages
    fresh = metrics.DatabaseCollector(
        Settings(runtime.config), runtime.db, runtime.owner, runtime.clock
    )  # `etl metrics`: reads every time
    first = page_of(throttled)
    insert_docs(runtime, [{"doc_key": "new", "body": "b"}])
    again = page_of(throttled)
    assert value(again, "etl_queue_rows", status="queued", task="default") == 0
    assert value(again, "etl_metrics_age_seconds") >= value(first, "etl_metrics_age_seconds")
    assert value(page_of(fresh), "etl_queue_rows", status="queued", task="default") == 1


def test_a_stale_read_is_served_at_once_while_the_next_one_runs_in_the_background(runtime: Harness) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    collector = metrics.DatabaseCollector(
        Settings(runtime.config), runtime.db, runtime.owner, runtime.clock, duty=1.0
    )  # every read is stale at once
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)

    def queued() -> float:
        return value(
            samples(generate_latest(reg).decode()), "etl_queue_rows", status="queued", task="default"
        )

    assert queued() == 0  # the first scrape waits for the first read
    insert_docs(runtime, [{"doc_key": "new", "body": "b"}])
    assert queued() == 0  # served the last read; a new one started behind it
    deadline = time.monotonic() + 60
    while queued() != 1:  # the background read lands (real work, not a timer)
        assert time.monotonic() < deadline, "the background read never landed"
        time.sleep(0.05)
