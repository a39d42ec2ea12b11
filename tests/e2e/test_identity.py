"""Issue 20: identity, not coincidence. Each finding reproduced as the issue describes it, on SQLite and
PostgreSQL: two installations on one API account, an extra results line, a SIGKILLed `etl submit`, a list
page out of order, and (in tests/e2e/test_owner_liveness.py) two processes in separate PID
namespaces under one hostname.

Every test ends with the same judgement: every document `done`, no answer in the wrong warehouse (each
warehouse row holds the emulator's answer to that row's own document), nothing billed twice, no batch
left open, `etl status --check` healthy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from etl import pipeline, reconciler
from etl.emulator import EmulatorControl, EmulatorServer
from etl.emulator.model import reply_text
from etl.errors import EtlError
from etl.prompt import Row, batch_body, build_params, custom_id, encode_request
from etl.status import status
from tests.conftest import API_KEY, SharedClock, insert_docs, queue_rows, run_etl
from tests.harness import Harness
from tests.ledger import by_row

GRACE = 600  # the tests' reconcile_grace_seconds


@pytest.fixture
def other_installation(
    db_url: str, make_pg_database: Callable[[], str], tmp_path: Path, make_runtime: Callable[..., Harness]
) -> Callable[..., Harness]:
    """A second installation (its own database of the same kind) on the same API account."""

    def make(**submit: Any) -> Harness:
        url = f"sqlite:///{tmp_path / 'production.db'}" if db_url.startswith("sqlite") else make_pg_database()
        return make_runtime(submit=submit or None, url=url)

    return make


def docs(n: int, who: str) -> list[dict[str, Any]]:
    return [{"doc_key": f"d{i:03d}", "body": f"{who} document number {i}"} for i in range(n)]


def wrong_answers(rt: Harness) -> list[str]:
    """Warehouse rows whose answer is not the emulator's answer to that row's own document."""
    with rt.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT q.id, q.doc_key, q.task, q.body, q.metadata, r.output_text FROM etl_results r "
                "JOIN etl_queue q ON q.id = r.queue_id"
            )
        ).all()
    bad = []
    for r in rows:
        params = build_params(Row(r.id, r.doc_key, r.task, r.body, r.metadata), rt.config.tasks, 10**6)
        if r.output_text != reply_text(params):
            bad.append(f"{r.doc_key}: {r.output_text!r}")
    return bad


def open_batches(rt: Harness) -> int:
    with rt.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM etl_batches WHERE status IN ('claimed','sending','unknown','submitted','ended')"
                )
            ).scalar_one()
        )


def assert_settled(rt: Harness, control: EmulatorControl, good: int) -> None:
    rows = queue_rows(rt)
    assert sum(1 for r in rows.values() if r["status"] == "done") == good, rows
    assert wrong_answers(rt) == []
    billed = by_row(control.ledger(), rt.installation())
    assert [k for k, n in billed.items() if n > 1] == []
    assert open_batches(rt) == 0
    _, healthy, problems = status(rt.config, rt.db, rt.owner, rt.clock())
    assert healthy, problems


# -- finding 1: another installation's batch never reads as ours ------------------------------------------


@pytest.mark.parametrize("both_ambiguous", [False, True], ids=["staging-ambiguous", "both-ambiguous"])
def test_two_installations_on_one_account_never_take_each_others_batch(
    make_runtime: Callable[..., Harness],
    other_installation: Callable[..., Harness],
    clock: SharedClock,
    control: EmulatorControl,
    both_ambiguous: bool,
) -> None:
    """Staging's create is ambiguous (the batch was made); production then sends a batch of the same size
    whose row ids are the same numbers (q1..q50); with `both-ambiguous` production's create is ambiguous
    too. Each adopts its own batch and only its own."""
    staging = make_runtime(submit={"max_requests_per_batch": 50})
    production = other_installation(max_requests_per_batch=50)
    assert staging.installation() != production.installation()
    insert_docs(staging, docs(50, "staging"))
    insert_docs(production, docs(50, "production"))
    ambiguous = {"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}
    control.set_faults(rules=[ambiguous])
    assert (
        pipeline.submit(
            staging.config, staging.db, staging.api, staging.me, staging.clock, staging.should_stop
        ).unknown
        == 1
    )
    if both_ambiguous:
        control.set_faults(rules=[ambiguous])
        assert (
            pipeline.submit(
                production.config,
                production.db,
                production.api,
                production.me,
                production.clock,
                production.should_stop,
            ).unknown
            == 1
        )
    else:
        control.clear_faults()
        assert (
            pipeline.submit(
                production.config,
                production.db,
                production.api,
                production.me,
                production.clock,
                production.should_stop,
            ).documents
            == 50
        )
    control.clear_faults()
    assert control.ledger()["batches_created"] == 2

    clock.advance(GRACE + 120)  # past the grace; both batches have ended
    for rt in (staging, production):
        reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)
        pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert control.ledger()["batches_created"] == 2
    for rt in (staging, production):
        assert_settled(rt, control, 50)
    assert sum(by_row(control.ledger()).values()) == 100  # 50 each, once


def test_a_batch_of_ours_that_no_intent_explains_fails_the_check_and_is_collected_while_its_rows_wait(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    """A create whose batch showed in the list only after its intent was released (the API's list can be
    late): billed, and nobody would collect it. Found, recorded by that intent, collected from it."""
    rt = runtime
    insert_docs(rt, docs(10, "late"))
    control.set_faults(
        rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}],
        list_delay_seconds=10 * GRACE,
    )
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    control.set_faults(list_delay_seconds=10 * GRACE)
    clock.advance(GRACE + 120)
    assert (
        reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop).released_unknown == 1
    )  # the list does not show it yet: released
    control.clear_faults()
    clock.advance(60)
    reconciler.run(
        rt.config, rt.db, rt.api, rt.clock, rt.should_stop
    )  # now listed, ended, and its ids are ours: the released intent records it
    with rt.engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM etl_batches WHERE id = 1")).scalar_one() == "submitted"
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert control.ledger()["batches_created"] == 1
    assert_settled(rt, control, 10)


def test_a_batch_of_ours_naming_no_intent_fails_the_check_until_acknowledged(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    """Ids of this installation naming an intent this database never had (a restored backup, a copied
    database): billed, and no intent can take it. `etl status --check` fails naming it."""
    rt = runtime
    params = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    stray = rt.provider.create_batch(
        batch_body([encode_request(custom_id(1, rt.installation(), 99), params)])
    )
    clock.advance(120)
    reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)
    _, healthy, problems = status(rt.config, rt.db, rt.owner, rt.clock())
    assert not healthy and any(stray.id in p and "never collected" in p for p in problems), problems
    reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)  # read once: not again
    with rt.engine.connect() as conn:
        events = conn.execute(text("SELECT count(*) FROM etl_events WHERE kind = 'unexplained'")).scalar_one()
    assert events == 1
    with pytest.raises(EtlError, match="not an unexplained batch"):
        reconciler.acknowledge(rt.db, "msgbatch_typo")
    reconciler.acknowledge(rt.db, stray.id)
    assert status(rt.config, rt.db, rt.owner, rt.clock())[1]


# -- finding 3: an extra line never keeps a batch open ------------------------------------------------------


@pytest.mark.parametrize("kind", ["another-batch", "foreign", "duplicate", "another-installation"])
def test_an_extra_results_line_never_keeps_a_batch_open(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl, kind: str
) -> None:
    rt = make_runtime(submit={"max_requests_per_batch": 50})
    insert_docs(rt, docs(100, "extra"))
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 100
    with rt.engine.connect() as conn:
        row = conn.execute(text("SELECT id, batch_ref FROM etl_queue WHERE batch_ref = 2 LIMIT 1")).one()
        first = conn.execute(text("SELECT id FROM etl_queue WHERE batch_ref = 1 LIMIT 1")).scalar_one()
    extra = {
        "another-batch": custom_id(row.id, rt.installation(), row.batch_ref),
        "foreign": "someone-elses-7",
        "duplicate": custom_id(first, rt.installation(), 1),
        "another-installation": custom_id(first, "0123456789ab", 1),
    }[kind]
    clock.advance(120)
    control.set_faults(
        rules=[{"endpoint": "results", "action": "extra_line", "custom_id": extra, "times": 1}]
    )
    out = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    control.clear_faults()
    assert out.batches_collected == 2
    assert any("another batch's rows" in p for p in out.problems)  # reported
    with rt.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM etl_events WHERE kind = 'extra_results'")).scalar_one()
            == 1
        )
    assert_settled(rt, control, 100)


# -- finding 4: a SIGKILLed `etl submit` does not strand its rows -------------------------------------------


def cli_env(db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]) -> dict[str, str]:
    return {
        "ETL_DATABASE_URL": db_url,
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "ETL_CONFIG": str(config_file()),
    }


def test_a_sigkilled_etl_submit_leaves_nothing_for_the_lease_the_next_submit_sends_at_once(
    db_url: str,
    runtime: Harness,
    emulator: EmulatorServer,
    clock: SharedClock,
    control: EmulatorControl,
    config_file: Callable[..., Path],
) -> None:
    rt = runtime
    insert_docs(rt, docs(30, "killed"))
    env = {**cli_env(db_url, emulator, config_file), **clock.env}
    killed = run_etl(["submit"], {**env, "ETL_FAILPOINTS": "submit.after_claim=kill"})
    assert killed.returncode == -9
    assert {r["status"] for r in queue_rows(rt).values()} == {"claimed"}
    again = run_etl(["submit"], env)  # no time has passed: the claim's lease has 10 minutes to run
    assert again.returncode == 0, again.stdout + again.stderr
    assert {r["status"] for r in queue_rows(rt).values()} == {"submitted"}
    clock.advance(120)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert_settled(rt, control, 30)


def test_etl_status_applies_the_dead_owner_rules_and_says_what_it_found(
    db_url: str, runtime: Harness, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    rt = runtime
    insert_docs(rt, docs(5, "status"))
    env = cli_env(db_url, emulator, config_file)
    assert run_etl(["submit"], {**env, "ETL_FAILPOINTS": "submit.after_claim=kill"}).returncode == -9
    shown = run_etl(["status"], env)
    assert "1 intent(s) taken back, 1 claim(s) returned to the queue" in shown.stdout, shown.stdout
    assert f"installation: {rt.installation()}" in shown.stdout
    assert {r["status"] for r in queue_rows(rt).values()} == {"queued"}


# -- finding 5: an unordered list page does not end the reading early ---------------------------------------


def test_an_unordered_list_page_does_not_release_a_batch_that_exists(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    """An old batch (3 days before), our recorded batch (the anchor), then our ambiguous create: the page
    lists the newest entry last. Reading entry by entry, the old batch ended the reading before our batch
    was seen, and the intent was released: its 10 rows sent and billed twice."""
    rt = make_runtime(submit={"max_requests_per_batch": 10})
    params = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    rt.provider.create_batch(batch_body([encode_request(f"old-{i}", params) for i in range(3)]))
    clock.advance(3 * 86400)
    insert_docs(rt, docs(10, "anchor"))
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).documents == 10
    clock.advance(5)
    insert_docs(rt, [{"doc_key": f"u{i}", "body": f"unordered {i}"} for i in range(10)])
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    assert pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop).unknown == 1
    control.clear_faults()
    clock.advance(GRACE + 120)
    control.set_faults(rules=[{"endpoint": "list", "action": "unordered"}])
    out = reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)
    control.clear_faults()
    assert (out.adopted, out.released_unknown) == (1, 0)
    pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert control.ledger()["batches_created"] == 3
    assert_settled(rt, control, 20)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL's proof is a session lock
def test_the_lock_file_of_a_finished_command_is_removed(db_url: str, runtime: Harness) -> None:
    """SQLite: proof of life is a flock on `<db>.owners/<token>.lock`; a clean exit leaves no file."""
    from etl import life

    runtime.me = life.hold(runtime.engine, runtime.me)
    folder = life.owners_dir(runtime.engine)
    assert folder is not None and len(os.listdir(folder)) == 1 and runtime.owner.endswith(":F")
    runtime.life.release()
    assert os.listdir(folder) == []
