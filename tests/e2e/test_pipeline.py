"""The nightly pipeline end to end, on SQLite and PostgreSQL, against the emulator through the real SDK."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import inspect, text

from etl import collector, failpoints, pipeline, report, settlement
from etl.emulator import EmulatorControl
from etl.emulator.model import reply_json, reply_text
from etl.prompt import Row, build_params
from tests.conftest import SharedClock, insert_docs, queue_rows
from tests.harness import Harness
from tests.ledger import by_row

DAY = 86400


def results_by_key(rt: Harness) -> dict[str, dict[str, Any]]:
    with rt.warehouse.connect() as conn:
        rows = conn.execute(text("SELECT * FROM etl_results"))
        return {f"{r.doc_key}/{r.task}": dict(r._mapping) for r in rows}


def expected_params(rt: Harness, qid: int, doc: dict[str, Any]) -> dict[str, Any]:
    row = Row(qid, doc["doc_key"], doc.get("task", "default"), doc["body"], doc.get("metadata"))
    return build_params(row, rt.config.tasks, rt.config.submit.max_body_bytes)


def cycle(rt: Harness, clock: SharedClock, hours: float = 2) -> collector.CollectOutcome:
    pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    clock.advance(hours * 3600)
    return pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)


def test_rows_inserted_with_plain_sql_end_in_the_warehouse_once_with_the_models_output(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    docs = [{"doc_key": f"doc-{i}", "body": f"Invoice {i} for {i * 7} crates of apples"} for i in range(25)]
    docs.append(
        {
            "doc_key": "c-1",
            "body": "Quarterly revenue grew",
            "task": "classify",
            "metadata": '{"title": "Q3"}',
        }
    )
    insert_docs(runtime, docs)
    out = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert (out.batches, out.documents, out.rejected) == (1, 26, 0)
    assert {r["status"] for r in queue_rows(runtime).values()} == {"submitted"}

    clock.advance(3600)
    col = pipeline.collect(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert (col.batches_collected, col.succeeded, col.requeued, col.dead) == (1, 26, 0, 0)

    rows = queue_rows(runtime)
    results = results_by_key(runtime)
    assert len(results) == 26
    for doc in docs:
        qid = rows[doc["doc_key"]]["id"]
        res = results[f"{doc['doc_key']}/{doc.get('task', 'default')}"]
        params = expected_params(runtime, qid, doc)
        if doc.get("task") == "classify":
            expected = reply_json(params)
            output_json = res["output_json"]
            if isinstance(output_json, str):
                output_json = json.loads(output_json)
            assert output_json == expected
        else:
            assert res["output_text"] == reply_text(params)
            assert res["output_json"] is None
        assert res["custom_id"] == f"q{qid}"
        assert res["model"] == "claude-haiku-4-5-20251001"
        assert res["input_tokens"] > 0 and res["output_tokens"] > 0
        assert 0 < res["cost_usd"] < res["standard_cost_usd"]
    assert {r["status"] for r in rows.values()} == {"done"}

    # Re-collecting changes nothing, and nobody was billed twice.
    again = pipeline.collect(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert again.batches_checked == 0
    assert len(results_by_key(runtime)) == 26
    ledger = control.ledger()
    assert ledger["batches_created"] == 1
    assert sorted(by_row(ledger).values()) == [1] * 26


def test_transient_errors_expired_and_invalid_requests_end_in_the_right_states(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    # Chunks of 3: the outcomes spread over several chunks, which SQLite settles together at the end.
    runtime.config = replace(runtime.config, collect=replace(runtime.config.collect, chunk_size=3))
    insert_docs(runtime, [{"doc_key": f"d{i}", "body": f"text number {i}"} for i in range(12)])
    ids = {k: v["id"] for k, v in queue_rows(runtime).items()}
    control.set_faults(
        outcomes=[
            {
                "custom_id": f"q{ids['d0']}(_.*)?|q{ids['d1']}(_.*)?",
                "outcome": "errored",
                "error_type": "overloaded_error",
            },
            {"custom_id": f"q{ids['d2']}(_.*)?", "outcome": "expired"},
            {
                "custom_id": f"q{ids['d3']}(_.*)?",
                "outcome": "errored",
                "error_type": "invalid_request_error",
                "message": "messages: text content blocks must be non-empty",
            },
            {"custom_id": f"q{ids['d4']}(_.*)?", "outcome": "canceled"},
        ]
    )
    out = cycle(runtime, clock)
    assert (out.succeeded, out.requeued, out.dead) == (7, 4, 1)
    rows = queue_rows(runtime)
    for key in ("d0", "d1"):
        assert (rows[key]["status"], rows[key]["attempts"]) == ("queued", 1)
        assert rows[key]["reason"].startswith("overloaded_error")
    assert (rows["d2"]["status"], rows["d2"]["attempts"]) == ("queued", 1)
    assert "expired" in rows["d2"]["reason"]
    assert (rows["d3"]["status"], rows["d3"]["attempts"]) == ("dead", 1)
    assert rows["d3"]["reason"] == "invalid_request_error: messages: text content blocks must be non-empty"
    # canceled: never processed, never billed, nothing wrong with it: back without using an attempt
    assert (rows["d4"]["status"], rows["d4"]["attempts"]) == ("queued", 0)
    assert rows["d4"]["reason"] == "canceled before the model processed it"
    assert all(rows[f"d{i}"]["status"] == "done" for i in range(5, 12))

    # The next night the re-queued rows succeed; the dead one is never sent again.
    control.clear_faults()
    out = cycle(runtime, clock)
    assert (out.succeeded, out.requeued, out.dead) == (4, 0, 0)
    rows = queue_rows(runtime)
    assert sorted(r["status"] for r in rows.values()).count("done") == 11
    assert by_row(control.ledger()).get(f"q{ids['d3']}") is None


def test_a_document_failing_three_times_goes_dead_with_its_attempts(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    insert_docs(
        runtime, [{"doc_key": "flaky", "body": "always overloaded"}, {"doc_key": "fine", "body": "ok"}]
    )
    qid = queue_rows(runtime)["flaky"]["id"]
    control.set_faults(
        outcomes=[{"custom_id": f"q{qid}(_.*)?", "outcome": "errored", "error_type": "overloaded_error"}]
    )
    attempts = []
    for _ in range(4):
        cycle(runtime, clock)
        attempts.append((queue_rows(runtime)["flaky"]["status"], queue_rows(runtime)["flaky"]["attempts"]))
    assert attempts == [("queued", 1), ("queued", 2), ("dead", 3), ("dead", 3)]
    assert queue_rows(runtime)["flaky"]["reason"].startswith(
        "gave up after 3 attempts; last: overloaded_error"
    )
    assert control.ledger()["batches_created"] == 3


def test_bad_rows_are_rejected_with_a_reason_and_never_reach_the_api(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    insert_docs(
        runtime,
        [
            {"doc_key": "empty", "body": ""},
            {"doc_key": "blank", "body": "   \n\t "},
            {"doc_key": "huge", "body": "x" * 1_100_000},
            {"doc_key": "no-task", "body": "hello", "task": "translate"},
            {"doc_key": "no-title", "body": "hello", "task": "classify", "metadata": '{"author": "me"}'},
            {"doc_key": "good", "body": "a perfectly fine document"},
        ],
    )
    out = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert (out.documents, out.rejected) == (1, 5)
    rows = queue_rows(runtime)
    assert rows["empty"]["reason"] == "body is empty or only whitespace"
    assert rows["blank"]["reason"] == "body is empty or only whitespace"
    assert rows["huge"]["reason"] == "body is 1,100,000 bytes; the limit is 1,000,000 (submit.max_body_bytes)"
    assert (
        rows["no-task"]["reason"] == "task 'translate' does not exist (configured tasks: classify, default)"
    )
    assert rows["no-title"]["reason"] == "metadata lacks 'title' required by the template of task 'classify'"
    assert {k for k, r in rows.items() if r["status"] == "rejected"} == {
        "empty",
        "blank",
        "huge",
        "no-task",
        "no-title",
    }
    assert control.ledger()["requests_created"] == 1
    clock.advance(3600)
    pipeline.collect(runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop)
    assert list(by_row(control.ledger())) == [f"q{rows['good']['id']}"]


def test_reenqueued_document_with_a_new_body_replaces_its_result(
    runtime: Harness, clock: SharedClock
) -> None:
    insert_docs(runtime, [{"doc_key": "policy", "body": "version one of the travel policy"}])
    cycle(runtime, clock)
    insert_docs(runtime, [{"doc_key": "policy", "body": "version two of the travel policy"}])
    cycle(runtime, clock)
    results = results_by_key(runtime)
    assert len(results) == 1
    assert "version two" in results["policy/default"]["output_text"]


def test_two_versions_of_a_document_in_one_batch_leave_the_newer_result(
    runtime: Harness, clock: SharedClock
) -> None:
    insert_docs(runtime, [{"doc_key": "policy", "body": "version one of the travel policy"}])
    insert_docs(runtime, [{"doc_key": "policy", "body": "version two of the travel policy"}])
    insert_docs(runtime, [{"doc_key": f"other{i}", "body": f"another document {i}"} for i in range(3)])
    out = cycle(runtime, clock)
    assert (out.batches_collected, out.succeeded) == (1, 4)  # version one is superseded, never sent
    results = results_by_key(runtime)
    assert len(results) == 4
    assert "version two" in results["policy/default"]["output_text"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_hand_written_enqueued_at_that_is_no_timestamp_does_not_stop_its_batch(
    runtime: Harness, clock: SharedClock
) -> None:
    """SQLite stores any text in `enqueued_at`; the result is written without it, the batch collected."""
    insert_docs(runtime, [{"doc_key": "odd", "body": "a document", "enqueued_at": "last tuesday"}])
    insert_docs(runtime, [{"doc_key": "fine", "body": "another document"}])
    out = cycle(runtime, clock)
    assert (out.batches_collected, out.succeeded, out.problems) == (1, 2, [])
    results = results_by_key(runtime)
    assert results["odd/default"]["enqueued_at"] is None
    assert results["fine/default"]["enqueued_at"] is not None


def test_morning_report_counts_and_costs_match_the_ledger(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    runtime.config = replace(runtime.config, collect=replace(runtime.config.collect, chunk_size=3))
    insert_docs(runtime, [{"doc_key": f"r{i}", "body": f"report document {i} " * (i + 1)} for i in range(10)])
    insert_docs(runtime, [{"doc_key": "bad", "body": " "}])
    qid = queue_rows(runtime)["r0"]["id"]
    control.set_faults(outcomes=[{"custom_id": f"q{qid}(_.*)?", "outcome": "expired"}])
    cycle(runtime, clock)
    body = report.morning(runtime.config, runtime.db, runtime.clock())
    task = body["tasks"]["default"]
    assert (task["submitted"], task["succeeded"], task["requeued"], task["rejected"]) == (10, 9, 1, 1)
    ledger = control.ledger()
    money = body["tokens_and_cost"]
    assert money["input_tokens"] == ledger["input_tokens"]
    assert money["output_tokens"] == ledger["output_tokens"]
    # Haiku 4.5: $1 / $5 per million at standard prices; batch is half.
    standard = (Decimal(ledger["input_tokens"]) * 1 + Decimal(ledger["output_tokens"]) * 5) / 1_000_000
    assert Decimal(money["standard_cost_usd"]) == standard
    assert Decimal(money["cost_usd"]) == standard / 2
    assert body["queue"]["queued"] == 1
    assert any("expired" in reason for reason in body["failures"])
    text_block = report.render(body)
    assert "saved $" in text_block and "default" in text_block


def test_batches_are_cut_by_bytes_as_well_as_by_count(
    make_runtime: Callable[..., Harness], clock: SharedClock, control: EmulatorControl
) -> None:
    rt = make_runtime(
        submit={"max_requests_per_batch": 400, "max_batch_bytes": 60_000, "max_body_bytes": 10_000}
    )
    insert_docs(rt, [{"doc_key": f"k{i}", "body": f"body {i} " + "y" * 100} for i in range(1000)])
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert out.documents == 1000 and out.batches >= 3  # the byte cap, not the count cap, decides here
    clock.advance(3600)
    col = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert col.succeeded == 1000 and col.batches_collected == out.batches
    assert len(results_by_key(rt)) == 1000
    assert sorted(by_row(control.ledger())) == sorted(f"q{r['id']}" for r in queue_rows(rt).values())


@pytest.mark.slow
def test_150k_document_queue_splits_into_batches_whose_custom_ids_all_map_back(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    with runtime.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO etl_queue (doc_key, body) VALUES (:doc_key, :body)"),
            [{"doc_key": f"n{i}", "body": f"note {i}"} for i in range(150_000)],
        )
    out = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert out.documents == 150_000 and out.batches == 2  # the API's 100,000-request cap
    clock.advance(3600)
    col = pipeline.collect(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert (col.succeeded, col.batches_collected) == (150_000, 2)
    ledger = control.ledger()
    with runtime.engine.connect() as conn:
        ids = {f"q{r[0]}" for r in conn.execute(text("SELECT id FROM etl_queue WHERE status = 'done'"))}
    assert len(ids) == 150_000 and set(by_row(ledger)) == ids
    assert set(by_row(ledger).values()) == {1}
    with runtime.warehouse.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM etl_results")).scalar_one() == 150_000


def test_results_go_to_a_separate_warehouse_database(
    make_runtime: Callable[..., Harness], clock: SharedClock, tmp_path: Any
) -> None:
    rt = make_runtime(warehouse_url=f"sqlite:///{tmp_path / 'warehouse.db'}")
    assert not rt.same_database
    insert_docs(rt, [{"doc_key": f"w{i}", "body": f"warehouse doc {i}"} for i in range(5)])
    out = cycle(rt, clock)
    assert out.succeeded == 5
    assert len(results_by_key(rt)) == 5
    assert not inspect(rt.engine).has_table("etl_results")
    assert inspect(rt.warehouse).has_table("etl_results")


def test_uncollected_batches_are_reported_late_then_requeued_when_their_results_vanish(
    runtime: Harness, clock: SharedClock, control: EmulatorControl
) -> None:
    insert_docs(runtime, [{"doc_key": f"l{i}", "body": f"late doc {i}"} for i in range(3)])
    pipeline.submit(runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop)
    control.set_faults(rules=[{"endpoint": "results", "action": "status", "status": 500}])
    clock.advance(8 * DAY)
    out = pipeline.collect(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert out.batches_collected == 0 and out.problems
    body = report.morning(runtime.config, runtime.db, runtime.clock())
    assert len(body["late"]) == 1
    assert body["late"][0]["why"].startswith("ended 19") and body["late"][0]["why"].endswith(
        "still not collected"
    )
    assert "!! LATE OR AT RISK" in report.render(body)

    clock.advance(22 * DAY)  # 30 days after creation: archived
    out = pipeline.collect(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert out.archived == 3
    rows = queue_rows(runtime)
    assert {r["status"] for r in rows.values()} == {"queued"}
    assert all("will be paid for again" in r["reason"] for r in rows.values())
    assert all(r["attempts"] == 0 for r in rows.values())
    body = report.morning(runtime.config, runtime.db, runtime.clock())
    assert body["tasks"]["default"]["archived"] == 3  # under its task, not an "(all)" pseudo-task


def test_a_request_too_big_for_any_batch_is_rejected_not_retried_forever(
    make_runtime: Callable[..., Harness], control: EmulatorControl
) -> None:
    rt = make_runtime(submit={"max_batch_bytes": 2_000, "max_body_bytes": 2_000})
    insert_docs(rt, [{"doc_key": "big", "body": "z" * 1_990}, {"doc_key": "small", "body": "tiny"}])
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert (out.documents, out.rejected) == (1, 1)
    reason = queue_rows(rt)["big"]["reason"]
    assert reason.startswith("request is ") and reason.endswith(
        "a batch may hold 2,000 (submit.max_batch_bytes)"
    )
    assert control.ledger()["requests_created"] == 1


def test_a_write_failing_mid_batch_stops_the_collect_and_the_next_collect_finishes_it(
    runtime: Harness, clock: SharedClock
) -> None:
    # Chunks are written on the collector's writer thread; its error must reach the caller, and the
    # chunks after it must not be written (their rows stay `submitted` for the next run).
    runtime.config = replace(runtime.config, collect=replace(runtime.config.collect, chunk_size=4))
    insert_docs(runtime, [{"doc_key": f"m{i}", "body": f"mid-batch failure {i}"} for i in range(30)])
    pipeline.submit(runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop)
    clock.advance(3600)
    failpoints.configure({"ETL_FAILPOINTS": "collect.after_warehouse=raise@3"})
    try:
        with pytest.raises(failpoints.FailpointHit):
            pipeline.collect(
                runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
            )
    finally:
        failpoints.configure({})
    assert len(results_by_key(runtime)) == 12  # three chunks of 4 committed, then the failure
    # PostgreSQL settles the queue rows with each chunk; SQLite once the stream is written, which the
    # failure prevented: the next collect writes the same 12 results again and settles all 30.
    settled = 0 if settlement.settles_per_batch(runtime.db) else 12
    statuses = Counter(r["status"] for r in queue_rows(runtime).values())
    assert statuses == Counter(done=settled, submitted=30 - settled)
    out = pipeline.collect(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert (out.batches_collected, out.succeeded) == (1, 30 - settled)
    assert len(results_by_key(runtime)) == 30
    assert {r["status"] for r in queue_rows(runtime).values()} == {"done"}


def test_a_submit_told_to_stop_before_its_first_batch_gives_the_claimed_rows_back(
    runtime: Harness, control: EmulatorControl
) -> None:
    """The first batch is claimed before the API's part of reconciliation (while the SDK loads); a stop
    requested by then sends nothing and leaves every row queued, not waiting for a lease to run out."""
    insert_docs(runtime, [{"doc_key": f"k{i}", "body": f"body {i}"} for i in range(5)])
    runtime.should_stop = lambda: True
    out = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    )
    assert (out.batches, out.documents, out.stopped) == (0, 0, "stop requested")
    rows = queue_rows(runtime)
    assert {r["status"] for r in rows.values()} == {"queued"} and len(rows) == 5
    with runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT DISTINCT batch_ref FROM etl_queue")).scalars().all() == [None]
        assert conn.execute(text("SELECT status FROM etl_batches")).scalars().all() == ["released"]
    assert by_row(control.ledger()) == {}
    runtime.should_stop = lambda: False
    assert (
        pipeline.submit(
            runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
        ).documents
        == 5
    )  # the next run takes them at once


def test_a_collect_before_the_batch_ends_changes_nothing_and_the_next_one_collects_it(
    make_runtime: Callable[..., Harness], clock: SharedClock
) -> None:
    """`etl collect` reads the first open batch's rows while the SDK loads; a batch still processing
    drops them, and the collect after it ends reads them again."""
    first = make_runtime()
    insert_docs(first, [{"doc_key": f"k{i}", "body": f"body {i}"} for i in range(6)])
    assert (
        pipeline.submit(first.config, first.db, first.api, first.me, first.clock, first.should_stop).documents
        == 6
    )
    early = make_runtime()  # a fresh process: its SDK is still loading when the collect starts
    out = pipeline.collect(early.config, early.db, early.api, early.me, early.clock, early.should_stop)
    assert (out.batches_checked, out.batches_collected, out.succeeded) == (1, 0, 0)
    assert {r["status"] for r in queue_rows(early).values()} == {"submitted"}
    clock.advance(3600)
    late = make_runtime()
    out = pipeline.collect(late.config, late.db, late.api, late.me, late.clock, late.should_stop)
    assert (out.batches_collected, out.succeeded) == (1, 6)
    assert {r["status"] for r in queue_rows(early).values()} == {"done"}


def test_a_batch_fills_its_byte_cap_exactly_and_records_the_bytes_it_sent(
    make_runtime: Callable[..., Harness],
) -> None:
    """`etl_batches.payload_bytes` is the size of the body sent (it was one byte more), and a batch takes
    requests up to `max_batch_bytes` exactly (it left the last one out when it fitted to the byte)."""
    from etl.prompt import batch_body, custom_id, encode_request

    first = make_runtime()
    docs = [{"doc_key": f"k{i}", "body": f"bødy {i} " + "y" * (i * 13 % 50)} for i in range(30)]
    insert_docs(first, docs)
    ids = {k: r["id"] for k, r in queue_rows(first).items()}
    installation = first.installation()  # the batch will be the database's first intent: id 1
    body = batch_body(
        [
            encode_request(
                custom_id(ids[d["doc_key"]], installation, 1), expected_params(first, ids[d["doc_key"]], d)
            )
            for d in docs
        ]
    )
    rt = make_runtime(submit={"max_batch_bytes": len(body), "max_body_bytes": 1000})
    out = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
    assert (out.batches, out.documents, out.payload_bytes) == (1, 30, len(body))
    with rt.engine.connect() as conn:
        recorded = conn.execute(text("SELECT payload_bytes FROM etl_batches WHERE batch_id IS NOT NULL"))
        assert recorded.scalar_one() == len(body)
