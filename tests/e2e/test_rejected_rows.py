"""A row no database could hold is refused with a reason before anything is sent, or ends `dead` alone when
a database refuses it, and every other row goes on (issue 12's finding 3 and its smaller findings: an
overlong key, an unstorable answer, invisible characters, older queued versions of a document).

Every test ends the same way: every good document `done`, nothing billed twice (the emulator's ledger),
no batch left open, and `etl status` healthy; and while something was stuck, `etl status` said so.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from etl import pipeline
from etl.emulator import EmulatorControl
from tests.conftest import SharedClock, insert_docs, queue_rows
from tests.e2e.settled import assert_settled, docs
from tests.harness import Harness
from tests.ledger import by_row

# -- finding 3: a value the unique index cannot hold ---------------------------------------------------


def test_a_doc_key_longer_than_its_limit_is_rejected_before_anything_is_sent(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    insert_docs(rt, [{"doc_key": "k" * 3000, "body": "a document with a very long key"}, *docs(100)])
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert (out.documents, out.rejected) == (100, 1)
    long_row = queue_rows(rt)["k" * 3000]
    assert long_row["status"] == "rejected"
    assert "doc_key is 3,000 bytes; the limit is 1,024" in long_row["reason"]
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert len(by_row(control.ledger())) == 100
    assert_settled(rt, control, 100)


def _refuse_poison_rows(rt: Harness) -> None:
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
    make_runtime: Callable[..., Harness],
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
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).batches == 3
    clock.advance(120)
    out = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert (out.batches_collected, out.succeeded, out.dead) == (3, 99, 2)
    rows = queue_rows(rt)
    for key in ("poison-1", "poison-2"):
        assert rows[key]["status"] == "dead"
        assert "warehouse refused the result" in rows[key]["reason"]
        assert "poison row refused by a trigger" in rows[key]["reason"]
    assert_settled(rt, control, 99)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite has no index entry size limit
def test_postgresql_index_limit_isolates_a_long_key_that_got_past_validation(
    make_runtime: Callable[..., Harness],
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
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).batches == 3
    clock.advance(120)
    out = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert (out.batches_collected, out.succeeded, out.dead) == (3, 100, 1)
    reason = queue_rows(rt)[long_key]["reason"]
    assert "index row size" in reason and "etl_results_pkey" in reason, reason
    assert_settled(rt, control, 100)


# -- smaller findings -----------------------------------------------------------------------------------


def test_only_the_newest_queued_row_of_a_document_is_sent_the_older_are_superseded(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    insert_docs(rt, [{"doc_key": f"pair{i}", "body": f"old {i}"} for i in range(25)])
    insert_docs(rt, docs(50))
    insert_docs(rt, [{"doc_key": f"pair{i}", "body": f"new {i}"} for i in range(25)])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 75
    with rt.engine.connect() as conn:
        old = conn.execute(text("SELECT id, status, reason FROM etl_queue WHERE body LIKE 'old %'")).all()
    assert {r.status for r in old} == {"superseded"} and len(old) == 25
    billed = by_row(control.ledger())
    assert not {f"q{r.id}" for r in old} & set(billed)
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    with rt.warehouse.connect() as conn:
        texts = conn.execute(text("SELECT output_text FROM etl_results WHERE doc_key LIKE 'pair%'")).scalars()
        assert all("new" in t for t in texts)
    assert_settled(rt, control, 75)


@pytest.mark.parametrize(
    "body", ["\u200b", "\ufeff\u200b\u200b", " \u2060 \u200d\n", "\u3164\u00a0", "\u180e\u2028"]
)
def test_a_body_of_invisible_characters_is_rejected_like_a_blank_one(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl, body: str
) -> None:
    rt = make_runtime()
    insert_docs(rt, [{"doc_key": "invisible", "body": body}, *docs(3)])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).rejected == 1
    row = queue_rows(rt)["invisible"]
    assert row["status"] == "rejected" and "only invisible characters" in row["reason"]
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert_settled(rt, control, 3)
