"""Issue 12's findings (and issue 14 item 8), each reproduced as the issue describes it, on both databases.

Every test ends the same way: every good document `done`, nothing billed twice (the emulator's ledger),
no batch left open, and `etl status` healthy; and while something was stuck, `etl status` said so.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from etl import config as config_mod
from etl import pipeline, reconciler
from etl.emulator import EmulatorControl, EmulatorServer
from etl.errors import SchemaIncomplete
from etl.prompt import encode_request
from etl.runtime import Runtime, build
from etl.status import status
from etl.store import migrate
from etl.store.engine import make_engine
from tests.conftest import API_KEY, SharedClock, insert_docs, queue_rows, run_etl
from tests.ledger import by_row

GRACE = 600  # the tests' reconcile_grace_seconds


def billed_twice(control: EmulatorControl) -> int:
    return sum(1 for n in by_row(control.ledger()).values() if n > 1)


def open_batches(rt: Runtime) -> int:
    with rt.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM etl_batches "
                    "WHERE status IN ('claimed', 'sending', 'unknown', 'submitted', 'ended')"
                )
            ).scalar_one()
        )


def problems(rt: Runtime) -> list[str]:
    _, healthy, found = status(rt)
    assert healthy == (not found)
    return found


def assert_settled(rt: Runtime, control: EmulatorControl, good: int) -> None:
    """The end state every finding must reach."""
    rows = queue_rows(rt)
    assert sum(1 for r in rows.values() if r["status"] == "done") == good
    assert billed_twice(control) == 0
    assert open_batches(rt) == 0
    assert problems(rt) == []


def docs(n: int, prefix: str = "d") -> list[dict[str, Any]]:
    return [{"doc_key": f"{prefix}{i:04d}", "body": f"document {prefix} {i}"} for i in range(n)]


# -- finding 1: a broken results read is not proof that a look-alike is someone else's -----------------


def test_a_lookalike_whose_results_read_breaks_is_waited_for_not_released(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl
) -> None:
    """100 documents, batches of 50; the first create's answer is lost (the batch was made); at the next
    run the look-alike's results stream is reset before its first line."""
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    insert_docs(rt, docs(100))
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    assert pipeline.submit(rt).unknown == 1
    control.clear_faults()
    assert any("create outcome unknown" in p for p in problems(rt))

    clock.advance(GRACE + 120)  # past the grace, and the look-alike has ended
    control.set_faults(
        rules=[{"endpoint": "results", "action": "stream_reset", "after_lines": 0, "times": 1}]
    )
    out = pipeline.submit(rt)  # reconciles first: the read breaks, so intent 1 waits; the other 50 go out
    control.clear_faults()
    assert out.documents == 50
    with rt.engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM etl_batches WHERE id = 1")).scalar_one() == "unknown"
    stuck = problems(rt)
    assert any("intent 1" in p and "past its grace" in p for p in stuck), stuck

    assert reconciler.run(rt).adopted == 1  # readable now: its custom_ids prove it ours
    clock.advance(120)
    pipeline.collect(rt)
    assert control.ledger()["batches_created"] == 2
    assert_settled(rt, control, 100)


# -- finding 2: ownership does not need our clock and the API's to agree -------------------------------


@pytest.mark.parametrize("skew", [600, -1200], ids=["host-ahead-600s", "host-behind-1200s"])
def test_an_ambiguous_create_is_adopted_whatever_the_host_clock_says(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl, skew: int
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    clock.offset += timedelta(seconds=skew)  # the host's clock only
    insert_docs(rt, docs(100))
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    assert pipeline.submit(rt).unknown == 1
    control.clear_faults()
    clock.advance(GRACE + 120)
    pipeline.submit(rt)  # adopts intent 1 (proved by its results), sends the other 50
    clock.advance(120)
    pipeline.collect(rt)
    assert control.ledger()["batches_created"] == 2
    assert_settled(rt, control, 100)


@pytest.mark.parametrize("skew", [600, -1200], ids=["host-ahead-600s", "host-behind-1200s"])
def test_an_unknown_create_that_made_no_batch_is_released_once_the_list_is_read_past_its_anchor(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl, skew: int
) -> None:
    """Batches recorded before the create bound the list read; a look-alike of someone else (same size,
    not ended) holds the release until it ends and its results prove it is not ours."""
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    clock.offset += timedelta(seconds=skew)
    insert_docs(rt, docs(50, "a"))
    assert pipeline.submit(rt).batches == 1  # the anchor of the next intent
    insert_docs(rt, docs(50, "b"))
    control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 529, "times": 1}])
    assert pipeline.submit(rt).unknown == 1  # no batch was made
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
    out = reconciler.run(rt)  # clock has not moved: the foreign batch has not ended, so intent 2 waits
    assert (out.released_unknown, out.still_unknown) == (0, 1)
    clock.advance(120)  # it ends; its first custom_id is not one of ours: proven absent
    out = reconciler.run(rt)
    assert out.released_unknown == 1
    pipeline.submit(rt)
    clock.advance(120)
    pipeline.collect(rt)
    ours = {k: v for k, v in by_row(control.ledger()).items() if k.startswith("q")}
    assert len(ours) == 100 and set(ours.values()) == {1}
    assert_settled(rt, control, 100)


# -- finding 3: a value the unique index cannot hold ---------------------------------------------------


def test_a_doc_key_longer_than_its_limit_is_rejected_before_anything_is_sent(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    insert_docs(rt, [{"doc_key": "k" * 3000, "body": "a document with a very long key"}, *docs(100)])
    out = pipeline.submit(rt)
    assert (out.documents, out.rejected) == (100, 1)
    long_row = queue_rows(rt)["k" * 3000]
    assert long_row["status"] == "rejected"
    assert "doc_key is 3,000 bytes; the limit is 1,024" in long_row["reason"]
    clock.advance(120)
    pipeline.collect(rt)
    assert len(by_row(control.ledger())) == 100
    assert_settled(rt, control, 100)


def _refuse_poison_rows(rt: Runtime) -> None:
    """A warehouse that refuses some rows: a trigger, on either database."""
    with rt.warehouse.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.doc_key LIKE 'poison%%' THEN RAISE EXCEPTION 'poison row refused by a trigger'; "
                "END IF; RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON etl_results "
                "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON etl_results "
                "WHEN NEW.doc_key LIKE 'poison%' "
                "BEGIN SELECT RAISE(ABORT, 'poison row refused by a trigger'); END"
            )


@pytest.mark.parametrize("warehouse", ["same", "separate"])
def test_a_row_the_warehouse_refuses_ends_dead_and_every_other_row_and_batch_is_collected(
    make_runtime: Callable[..., Runtime],
    clock: SharedClock,
    control: EmulatorControl,
    db_url: str,
    tmp_path: Path,
    make_pg_database: Callable[[], str],
    warehouse: str,
) -> None:
    url = ""
    if warehouse == "separate":
        url = make_pg_database() if db_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'wh.db'}"
    rt = make_runtime(submit={"max_requests_per_batch": 50}, warehouse_url=url)
    insert_docs(
        rt, [{"doc_key": "poison-1", "body": "refused"}, *docs(99), {"doc_key": "poison-2", "body": "x"}]
    )
    _refuse_poison_rows(rt)
    assert pipeline.submit(rt).batches == 3
    clock.advance(120)
    out = pipeline.collect(rt)
    assert (out.batches_collected, out.succeeded, out.dead) == (3, 99, 2)
    rows = queue_rows(rt)
    for key in ("poison-1", "poison-2"):
        assert rows[key]["status"] == "dead"
        assert "warehouse refused the result" in rows[key]["reason"]
        assert "poison row refused by a trigger" in rows[key]["reason"]
    assert_settled(rt, control, 99)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite has no index entry size limit
def test_postgresql_index_limit_isolates_a_long_key_that_got_past_validation(
    make_runtime: Callable[..., Runtime],
    clock: SharedClock,
    control: EmulatorControl,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The finding itself: a 3,000-character key reaches the warehouse (here: the limit lifted)."""
    assert db_url.startswith("postgresql")
    monkeypatch.setattr("etl.prompt.MAX_DOC_KEY_BYTES", 10_000)
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    pick = random.Random(12)
    long_key = "".join(pick.choice(string.ascii_letters + string.digits) for _ in range(3000))
    insert_docs(rt, [{"doc_key": long_key, "body": "long key"}, *docs(100)])
    assert pipeline.submit(rt).batches == 3
    clock.advance(120)
    out = pipeline.collect(rt)
    assert (out.batches_collected, out.succeeded, out.dead) == (3, 100, 1)
    reason = queue_rows(rt)[long_key]["reason"]
    assert "index row size" in reason and "etl_results_pkey" in reason, reason
    assert_settled(rt, control, 100)


def test_a_batch_that_cannot_be_collected_is_named_by_status_and_does_not_stop_the_others(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 5})
    insert_docs(rt, docs(10))
    assert pipeline.submit(rt).batches == 2
    clock.advance(120)
    with rt.warehouse.begin() as conn:  # the warehouse cannot be written at all for a while
        conn.exec_driver_sql("ALTER TABLE etl_results RENAME TO etl_results_away")
    out = pipeline.collect(rt)
    assert out.batches_collected == 0 and len(out.problems) == 2  # both tried, neither stopped the run
    stuck = problems(rt)
    assert sum("last collect failed" in p for p in stuck) == 2, stuck
    with rt.warehouse.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE etl_results_away RENAME TO etl_results")
    assert pipeline.collect(rt).batches_collected == 2
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


# -- smaller findings -----------------------------------------------------------------------------------


def test_only_the_newest_queued_row_of_a_document_is_sent_the_older_are_superseded(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    insert_docs(rt, [{"doc_key": f"pair{i}", "body": f"old {i}"} for i in range(25)])
    insert_docs(rt, docs(50))
    insert_docs(rt, [{"doc_key": f"pair{i}", "body": f"new {i}"} for i in range(25)])
    assert pipeline.submit(rt).documents == 75
    with rt.engine.connect() as conn:
        old = conn.execute(text("SELECT id, status, reason FROM etl_queue WHERE body LIKE 'old %'")).all()
    assert {r.status for r in old} == {"superseded"} and len(old) == 25
    billed = by_row(control.ledger())
    assert not {f"q{r.id}" for r in old} & set(billed)
    clock.advance(120)
    pipeline.collect(rt)
    with rt.warehouse.connect() as conn:
        texts = conn.execute(text("SELECT output_text FROM etl_results WHERE doc_key LIKE 'pair%'")).scalars()
        assert all("new" in t for t in texts)
    assert_settled(rt, control, 75)


@pytest.mark.parametrize(
    "body", ["\u200b", "\ufeff\u200b\u200b", " \u2060 \u200d\n", "\u3164\u00a0", "\u180e\u2028"]
)
def test_a_body_of_invisible_characters_is_rejected_like_a_blank_one(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl, body: str
) -> None:
    rt = make_runtime()
    insert_docs(rt, [{"doc_key": "invisible", "body": body}, *docs(3)])
    assert pipeline.submit(rt).rejected == 1
    row = queue_rows(rt)["invisible"]
    assert row["status"] == "rejected" and "only invisible characters" in row["reason"]
    clock.advance(120)
    pipeline.collect(rt)
    assert_settled(rt, control, 3)


def test_rows_set_to_submitted_or_claimed_by_hand_are_reported_as_stuck(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl
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
    pipeline.submit(rt)
    clock.advance(120)
    pipeline.collect(rt)
    assert_settled(rt, control, 3)


# -- issue 14 item 8: a connection that was never made sent nothing -----------------------------------


def test_a_refused_connection_sends_nothing_and_the_rows_go_back_at_once(
    make_runtime: Callable[..., Runtime],
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
        out = pipeline.submit(rt)
        assert out.unknown == 0 and out.stopped is not None and out.stopped.startswith("API unreachable")
        assert {r["status"] for r in queue_rows(rt).values()} == {"queued"}
        assert problems(rt) == []
    finally:
        rt.close()
    assert pipeline.submit(good).documents == 4  # at once: no grace to wait out
    clock.advance(120)
    pipeline.collect(good)
    assert_settled(good, control, 4)


def test_an_unknown_intent_says_when_it_is_released_and_the_operator_can_release_it(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime()
    insert_docs(rt, docs(4))
    control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 504, "times": 1}])
    assert pipeline.submit(rt).unknown == 1
    control.clear_faults()
    stuck = problems(rt)
    assert any("released at the first reconcile after" in p and "--release 1" in p for p in stuck), stuck
    assert reconciler.release_by_operator(rt, 1) == 4
    with pytest.raises(Exception, match="intent 1 is released, not unknown"):
        reconciler.release_by_operator(rt, 1)
    pipeline.submit(rt)
    clock.advance(120)
    pipeline.collect(rt)
    assert_settled(rt, control, 4)


# -- the same rule elsewhere: a refused results read is not proof that the results are gone -------------


@pytest.mark.parametrize("skew_days", [0, 30], ids=["same-clock", "host-30-days-ahead"])
def test_results_are_treated_as_archived_only_on_the_apis_word(
    make_runtime: Callable[..., Runtime], clock: SharedClock, control: EmulatorControl, skew_days: int
) -> None:
    """A 404 from the results endpoint, or a host clock past the 29 days, used to re-queue every row of a
    batch whose results still existed: all of them paid for twice."""
    rt = make_runtime()
    insert_docs(rt, docs(6))
    assert pipeline.submit(rt).documents == 6
    clock.advance(120)
    clock.offset += timedelta(days=skew_days)
    control.set_faults(rules=[{"endpoint": "results", "action": "status", "status": 404, "times": 1}])
    out = pipeline.collect(rt)
    control.clear_faults()
    assert (out.archived, out.batches_collected) == (0, 0)
    assert any("last collect failed" in p or "results unavailable" in p for p in problems(rt))
    assert pipeline.collect(rt).batches_collected == 1
    assert_settled(rt, control, 6)
