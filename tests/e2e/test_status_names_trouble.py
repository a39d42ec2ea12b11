"""`etl status` names what is stuck or incomplete: a batch that cannot be collected, rows set by hand, a
schema half made by a failed upgrade (issue 12's findings), on both databases.

Every test ends the same way: every good document `done`, nothing billed twice (the emulator's ledger),
no batch left open, and `etl status` healthy; and while something was stuck, `etl status` said so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from etl import pipeline
from etl.emulator import EmulatorControl, EmulatorServer
from etl.errors import SchemaIncomplete
from etl.store import migrate
from etl.store.engine import make_engine
from tests.conftest import API_KEY, SharedClock, insert_docs, run_etl
from tests.e2e.settled import assert_settled, docs, problems
from tests.harness import Harness


def test_a_batch_that_cannot_be_collected_is_named_by_status_and_does_not_stop_the_others(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 5})
    insert_docs(rt, docs(10))
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).batches == 2
    clock.advance(120)
    with rt.warehouse.begin() as conn:  # the warehouse cannot be written at all for a while
        conn.exec_driver_sql("ALTER TABLE etl_results RENAME TO etl_results_away")
    out = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.batches_collected == 0 and len(out.problems) == 2  # both tried, neither stopped the run
    stuck = problems(rt)
    assert sum("last collect failed" in p for p in stuck) == 2, stuck
    with rt.warehouse.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE etl_results_away RENAME TO etl_results")
    assert pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).batches_collected == 2
    assert_settled(rt, control, 10)


# -- finding 4: a schema is complete on both databases or nothing is sent -------------------------------


def test_a_failed_upgrade_then_one_without_the_warehouse_leaves_no_schema_that_looks_healthy(
    db_url: str, emulator: EmulatorServer, clock: SharedClock, control: EmulatorControl, tmp_path: Path
) -> None:
    engine = make_engine(db_url)
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        migrate.upgrade(engine, unreachable)  # the main database is done with role "main", then it fails
    with pytest.raises(SchemaIncomplete, match=r"lacks table\(s\) etl_results.*Run: etl db upgrade"):
        migrate.check(engine, engine)
    env = {"ETL_DATABASE_URL": db_url, "ANTHROPIC_BASE_URL": emulator.base_url, "ANTHROPIC_API_KEY": API_KEY}
    env.update(clock.env)
    (tmp_path / "etl.toml").write_text(
        '[tasks.default]\nmodel = "claude-haiku-4-5"\ntemplate = "{body}"\nmax_tokens = 50\n',
        encoding="utf-8",
    )
    env["ETL_CONFIG"] = str(tmp_path / "etl.toml")
    checked = run_etl(["status", "--check"], env)
    assert checked.returncode == 78 and "lacks table(s) etl_results" in checked.stderr
    sent = run_etl(["submit"], env)
    assert sent.returncode == 78 and control.ledger()["batches_created"] == 0
    upgraded = run_etl(["db", "upgrade"], env)
    assert upgraded.returncode == 0 and "made missing table(s): etl_results" in upgraded.stdout
    migrate.check(engine, engine)
    engine.dispose()
    unreachable.dispose()


def test_rows_set_to_submitted_or_claimed_by_hand_are_reported_as_stuck(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime()
    insert_docs(rt, docs(3))
    with rt.engine.begin() as conn:
        conn.execute(text("UPDATE etl_queue SET status = 'submitted' WHERE doc_key = 'd0000'"))
        conn.execute(text("UPDATE etl_queue SET status = 'claimed' WHERE doc_key = 'd0001'"))
    stuck = problems(rt)
    assert any("1 row(s) 'submitted' with no open batch" in p for p in stuck), stuck
    assert any("1 row(s) 'claimed' with no live intent" in p for p in stuck), stuck
    with rt.engine.begin() as conn:  # the operator's fix, as the line says
        conn.execute(text("UPDATE etl_queue SET status = 'queued' WHERE doc_key IN ('d0000', 'd0001')"))
    pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert_settled(rt, control, 3)
