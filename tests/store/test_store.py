"""Store behaviour on both databases: schema, claims, guarded transitions, upserts, leases."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, select, text

from etl.errors import SchemaOutOfDate
from etl.store import batches as intents
from etl.store import migrate, schema, state, warehouse
from etl.store import queue as q
from etl.store.engine import (
    SQLITE_BULK_WAL_BYTES,
    SQLITE_WAL_AUTOCHECKPOINT_PAGES,
    bulk_writes,
    make_engine,
    reading,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(db_url: str) -> Engine:
    eng = make_engine(db_url)
    migrate.upgrade(eng, eng)
    yield eng  # type: ignore[misc]
    eng.dispose()


def add_docs(engine: Engine, n: int, **extra: Any) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO etl_queue (doc_key, body) VALUES (:k, :b)"),
            [{"k": f"d{i}", "b": f"body {i}"} for i in range(n)],
        )


def test_migrated_schema_equals_the_declared_one(engine: Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        declared = MetaData()
        for table in [*schema.metadata.tables.values(), *schema.warehouse_metadata.tables.values()]:
            table.to_metadata(declared)
        diff = compare_metadata(ctx, declared)
    # Alembic's own version table is not declared; anything else is drift.
    diff = [d for d in diff if not (d[0] == "remove_table" and d[1].name.endswith("alembic_version"))]
    assert diff == []


def test_a_database_without_schema_refuses_to_start_and_names_the_command(db_url: str) -> None:
    eng = make_engine(db_url)
    with pytest.raises(SchemaOutOfDate, match=r"has no schema yet.*Run: etl db upgrade"):
        migrate.check(eng, eng)
    migrate.upgrade(eng, eng)
    migrate.check(eng, eng)
    assert migrate.upgrade(eng, eng)[0][1] == migrate.head_revision()  # idempotent
    eng.dispose()


def test_the_start_up_check_knows_the_newest_migration() -> None:
    # `check` compares with the constant (it does not import Alembic); a new migration must update it.
    assert migrate.head_revision() == migrate.HEAD


def test_a_database_behind_the_code_is_refused_with_its_revision(db_url: str) -> None:
    eng = make_engine(db_url)
    migrate.upgrade(eng, eng)
    with eng.begin() as conn:
        conn.execute(text(f"UPDATE {schema.SCHEMA_VERSION_TABLE} SET version_num = '0001'"))
    with pytest.raises(SchemaOutOfDate, match=rf"is at schema revision 0001.*needs {migrate.HEAD}"):
        migrate.check(eng, eng)
    eng.dispose()


def test_plain_sql_insert_needs_only_doc_key_and_body(engine: Engine) -> None:
    add_docs(engine, 1)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT task, status, attempts, priority, enqueued_at FROM etl_queue")).one()
    assert (row.task, row.status, row.attempts, row.priority) == ("default", "queued", 0, 0)
    assert row.enqueued_at is not None


def test_status_outside_the_enum_is_refused_by_the_database(engine: Engine) -> None:
    with pytest.raises(Exception, match=r"(?i)check"), engine.begin() as conn:
        conn.execute(text("INSERT INTO etl_queue (doc_key, body, status) VALUES ('x', 'y', 'completed')"))


def test_concurrent_claimers_never_take_the_same_row(engine: Engine) -> None:
    add_docs(engine, 500)
    taken: dict[int, int] = {}
    errors: list[BaseException] = []

    def claimer() -> None:
        try:
            for _ in range(20):
                with engine.begin() as conn:
                    intent = intents.create_intent(conn, "w", NOW + timedelta(minutes=5), NOW)
                    n = q.claim(conn, intent, 30, NOW)
                taken[intent] = n
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT batch_ref, count(*) FROM etl_queue GROUP BY batch_ref")).all()
    per_intent = {r[0]: r[1] for r in rows}
    assert sum(taken.values()) == 500
    assert {k: v for k, v in per_intent.items() if k is not None} == {k: v for k, v in taken.items() if v}


def test_claims_follow_priority_then_age(engine: Engine) -> None:
    add_docs(engine, 5)
    with engine.begin() as conn:
        conn.execute(text("UPDATE etl_queue SET priority = 9 WHERE doc_key = 'd3'"))
        intent = intents.create_intent(conn, "w", NOW + timedelta(minutes=5), NOW)
        q.claim(conn, intent, 2, NOW)
        claimed = [r.doc_key for r in q.iter_claimed(conn, intent)]
    assert sorted(claimed) == ["d0", "d3"]


def test_fence_refuses_an_owner_whose_lease_ran_out_or_was_taken(engine: Engine) -> None:
    with engine.begin() as conn:
        intent = intents.create_intent(conn, "a", NOW + timedelta(minutes=5), NOW)
        assert not intents.fence_sending(conn, intent, "b", NOW)  # not the owner
        assert not intents.fence_sending(conn, intent, "a", NOW + timedelta(minutes=6))  # lease over
        assert intents.fence_sending(conn, intent, "a", NOW)
        assert not intents.fence_sending(conn, intent, "a", NOW)  # already sending
        assert intents.mark_unknown(conn, intent, "timeout")
        assert not intents.release(conn, intent, (schema.BatchStatus.CLAIMED,), "stale view")


def test_guarded_updates_never_overwrite_a_newer_outcome(engine: Engine) -> None:
    add_docs(engine, 3)
    with engine.begin() as conn:
        intent = intents.create_intent(conn, "a", NOW + timedelta(minutes=5), NOW)
        q.claim(conn, intent, 3, NOW)
        q.mark_submitted(conn, intent, NOW)
        ids = [r[0] for r in conn.execute(select(schema.queue.c.id).order_by(schema.queue.c.id))]
        assert q.mark_done(conn, intent, ids[:1], NOW) == 1
        # A stale collector replaying the same chunk, or requeueing a finished row, changes nothing.
        assert q.mark_done(conn, intent, ids[:1], NOW) == 0
        assert q.requeue(conn, intent, [(ids[0], "expired")], NOW, count_attempt=True) == 0
        assert q.requeue(conn, intent, [(ids[1], "expired")], NOW, count_attempt=True) == 1
        assert q.kill(conn, intent, [(ids[1], "late duplicate")], NOW) == 0
        rows = conn.execute(
            select(schema.queue.c.status, schema.queue.c.attempts).order_by(schema.queue.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [("done", 0), ("queued", 1), ("submitted", 0)]


def test_sent_rows_are_every_row_of_the_intent_as_stored(engine: Engine) -> None:
    keys = ["plain", 'quo"te\\back', "new\nline", "ünïcødé ✓", "tab\tand \x01 control"]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO etl_queue (doc_key, body, task) VALUES (:k, 'b', :t)"),
            [{"k": k, "t": "classify" if i % 2 else "default"} for i, k in enumerate(keys)],
        )
        add_other = conn.execute(text("INSERT INTO etl_queue (doc_key, body) VALUES ('other', 'b')"))
        assert add_other.rowcount == 1
        intent = intents.create_intent(conn, "a", NOW + timedelta(minutes=5), NOW)
        q.claim(conn, intent, len(keys), NOW)
        q.mark_submitted(conn, intent, NOW)
        rows = q.sent_rows(conn, intent)
        assert sorted(map(tuple, q.sent_rows(conn, intent, packed=True))) == sorted(map(tuple, rows))
        plain = conn.execute(
            select(schema.queue.c.id, schema.queue.c.doc_key, schema.queue.c.task, schema.queue.c.attempts)
            .where(schema.queue.c.batch_ref == intent)
            .order_by(schema.queue.c.id)
        ).all()
    got = sorted((r[0], r[1], r[2], r[3], r[4]) for r in rows)
    assert got == [(*tuple(r), "submitted") for r in plain]
    assert sorted(r[1] for r in rows) == sorted(keys)
    assert {schema.as_utc(r[5]) for r in rows} == {schema.as_utc(rows[0][5])} and rows[0][5] is not None


def test_sqlite_sent_rows_fall_back_to_a_plain_read_for_a_value_json_cannot_hold(tmp_path: Path) -> None:
    """Only SQLite reads the rows as one JSON array, and only it can hold a BLOB doc_key."""
    engine = make_engine(f"sqlite:///{tmp_path / 'blob.db'}")
    migrate.upgrade(engine, engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO etl_queue (doc_key, body) VALUES (x'00ff', 'b'), ('text', 'b')"))
        intent = intents.create_intent(conn, "a", NOW + timedelta(minutes=5), NOW)
        q.claim(conn, intent, 2, NOW)
        rows = q.sent_rows(conn, intent, packed=True)
    assert sorted(r[1] for r in rows if isinstance(r[1], str)) == ["text"]
    assert [r[1] for r in rows if not isinstance(r[1], str)] == [b"\x00\xff"]
    engine.dispose()


def result_row(queue_id: int, text_: str) -> dict[str, Any]:
    return {
        "doc_key": "k",
        "task": "default",
        "queue_id": queue_id,
        "custom_id": f"q{queue_id}",
        "output_text": text_,
        "output_json": None,
        "model": "m",
        "stop_reason": "end_turn",
        "input_tokens": 1,
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cost_usd": Decimal("0.1"),
        "standard_cost_usd": Decimal("0.2"),
        "batch_id": "b",
        "enqueued_at": NOW,
        "batch_ended_at": NOW,
        "collected_at": NOW,
    }


def test_warehouse_upsert_is_idempotent_and_the_newest_document_version_wins(engine: Engine) -> None:
    with engine.begin() as conn:
        warehouse.upsert(conn, [result_row(5, "v5")])
        warehouse.upsert(conn, [result_row(5, "v5")])
        warehouse.upsert(conn, [result_row(9, "v9")])
        warehouse.upsert(conn, [result_row(7, "late result of an older version")])
        rows = conn.execute(select(schema.results.c.queue_id, schema.results.c.output_text)).all()
    assert [tuple(r) for r in rows] == [(9, "v9")]


def test_one_upsert_of_many_rows_splits_into_statements_and_keeps_the_newest_per_key(engine: Engine) -> None:
    # More rows than one SQLite statement takes (and a partial last one); keys repeat across and within
    # statements, in no order: per key the highest queue_id wins, as if applied one by one.
    n = warehouse.SQLITE_ROWS_PER_STATEMENT * 2 + 7
    rows = []
    for i in range(n):
        row = result_row(1000 + (i * 7919) % n, f"text {i}")
        row["doc_key"] = f"k{i % 300}"
        row["output_json"] = {"i": i} if i % 2 else None
        rows.append(row)
    with engine.begin() as conn:
        warehouse.upsert(conn, rows)
        stored = conn.execute(
            select(
                schema.results.c.doc_key,
                schema.results.c.queue_id,
                schema.results.c.output_text,
                schema.results.c.output_json,
                schema.results.c.collected_at,
            )
        ).all()
    newest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["doc_key"] not in newest or row["queue_id"] > newest[row["doc_key"]]["queue_id"]:
            newest[row["doc_key"]] = row
    assert len(stored) == 300
    for doc_key, queue_id, output_text, output_json, collected_at in stored:
        want = newest[doc_key]
        assert (queue_id, output_text, output_json) == (
            want["queue_id"],
            want["output_text"],
            want["output_json"],
        )
        assert collected_at == NOW


def test_rows_with_unique_keys_are_merged_under_the_same_guard(engine: Engine) -> None:
    """The collector's path when a batch sent each (doc_key, task) once: no de-duplication, same guard."""
    encoder = warehouse.Encoder(engine.dialect)

    def encoded(*rows: dict[str, Any]) -> warehouse.Encoded:
        return warehouse.Encoded(encoder.dialect, [encoder.encode(r) for r in rows], unique_keys=True)

    first, other = result_row(5, "v5"), {**result_row(6, "other v6"), "doc_key": "other"}
    with engine.begin() as conn:
        warehouse.write(conn, encoded(first, other))
        warehouse.write(conn, encoded(result_row(9, "v9"), {**other, "output_text": "same version again"}))
        warehouse.write(conn, encoded(result_row(7, "late result of an older version")))
        rows = conn.execute(
            select(
                schema.results.c.doc_key, schema.results.c.queue_id, schema.results.c.output_text
            ).order_by(schema.results.c.doc_key)
        ).all()
    assert [tuple(r) for r in rows] == [("k", 9, "v9"), ("other", 6, "same version again")]


def test_rows_encoded_for_one_dialect_are_not_written_to_another(engine: Engine) -> None:
    other = "postgresql" if engine.dialect.name == "sqlite" else "sqlite"
    with pytest.raises(ValueError, match=f"encoded for {other}"), engine.begin() as conn:
        warehouse.write(conn, warehouse.Encoded(other, [["x"] * len(warehouse.COLUMNS)]))


def test_named_lease_has_one_holder_until_it_expires(engine: Engine) -> None:
    ttl = timedelta(seconds=60)
    with engine.begin() as conn:
        assert state.acquire_lease(conn, "leader", "a", NOW, ttl)
        assert not state.acquire_lease(conn, "leader", "b", NOW + timedelta(seconds=30), ttl)
        assert state.acquire_lease(conn, "leader", "a", NOW + timedelta(seconds=30), ttl)  # renew
        assert state.acquire_lease(conn, "leader", "b", NOW + timedelta(seconds=91), ttl)  # a died


def test_a_job_slot_runs_once_across_instances(engine: Engine) -> None:
    slot = datetime(2026, 11, 21, 0, 0, tzinfo=UTC)
    with engine.begin() as conn:
        assert state.start_run(conn, "submit", slot, "r1", "host-a", NOW)
        assert not state.start_run(conn, "submit", slot, "r2", "host-b", NOW)
        state.finish_run(conn, "r1", "ok", None, NOW)
        assert state.last_slot(conn, "submit") == slot


def test_pause_keeps_the_first_reason_until_resumed(engine: Engine) -> None:
    with engine.begin() as conn:
        state.pause(conn, "spend limit reached", NOW)
        state.pause(conn, "billing error", NOW)
        assert state.pause_reason(conn) == "spend limit reached"
        assert state.resume(conn) == "spend limit reached"
        assert state.pause_reason(conn) is None


def test_a_reader_does_not_hold_the_write_lock_while_it_reads(engine: Engine) -> None:
    """A submit builds its batch through a long read; its own lease renewal must still be able to write."""
    add_docs(engine, 3)
    with reading(engine) as reader:
        rows = reader.execute(text("SELECT id FROM etl_queue")).all()
        with engine.begin() as writer:
            changed = writer.execute(text("UPDATE etl_queue SET priority = 1")).rowcount
        assert len(rows) == 3 and changed == 3


def _wal_setting(conn: Any) -> int:
    return int(conn.connection.driver_connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0])


def test_bulk_writes_commit_each_transaction_and_leave_the_connection_as_they_found_it(
    engine: Engine,
) -> None:
    """A collect's chunks commit one by one (each is durable and visible at once); on SQLite the WAL is
    checkpointed at the end instead of after every commit, and the pooled connection gets its setting back."""
    add_docs(engine, 4)
    sqlite = engine.dialect.name == "sqlite"
    with bulk_writes(engine) as conn:
        if sqlite:
            assert _wal_setting(conn) == SQLITE_BULK_WAL_BYTES // 4096 > SQLITE_WAL_AUTOCHECKPOINT_PAGES
        for priority in (1, 2):
            with conn.begin():
                conn.execute(text("UPDATE etl_queue SET priority = :p"), {"p": priority})
            with engine.connect() as other:  # committed: another connection sees it
                assert other.execute(text("SELECT max(priority) FROM etl_queue")).scalar() == priority
        wal = engine.url.database + "-wal" if sqlite and engine.url.database else None
        frames_before = os.path.getsize(wal) if wal else 0
    if sqlite:
        assert frames_before > 0  # the commits sat in the WAL...
        with engine.connect() as conn:
            assert _wal_setting(conn) == SQLITE_WAL_AUTOCHECKPOINT_PAGES
            busy, log_frames, checkpointed = conn.connection.driver_connection.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
            assert (busy, log_frames - checkpointed) == (0, 0)  # ...and all of it is in the database file now


def test_bulk_writes_roll_back_a_failed_transaction_and_keep_the_earlier_ones(engine: Engine) -> None:
    add_docs(engine, 2)
    with bulk_writes(engine) as conn:
        with conn.begin():
            conn.execute(text("UPDATE etl_queue SET priority = 5"))
        with pytest.raises(RuntimeError), conn.begin():
            conn.execute(text("UPDATE etl_queue SET priority = 9"))
            raise RuntimeError("write failed mid-chunk")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT DISTINCT priority FROM etl_queue")).scalars().all() == [5]
