"""Money columns on SQLite and PostgreSQL: exact round trips, exact sums, and migration 0005's conversion."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select, text

from etl.clock import ensure_utc
from etl.store import events, migrate, schema, warehouse
from etl.store.engine import make_engine

NOW = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
MONEY = st.decimals(min_value=Decimal(0), max_value=Decimal("99999999"), places=10)


def result_row(i: int, cost: object, standard: object) -> dict[str, object]:
    return {
        "doc_key": f"k{i}",
        "task": "default",
        "queue_id": i,
        "custom_id": f"q{i}",
        "output_text": "x",
        "output_json": None,
        "model": "claude-haiku-4-5",
        "stop_reason": "end_turn",
        "input_tokens": 1,
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cost_usd": cost,
        "standard_cost_usd": standard,
        "batch_id": "b",
        "enqueued_at": NOW,
        "batch_ended_at": NOW,
        "collected_at": NOW,
    }


def test_money_round_trips_exactly_and_sums_exactly_through_the_bulk_write_paths(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate.upgrade(engine, engine)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(MONEY, st.booleans()), min_size=1, max_size=30))
    def check(generated: list[tuple[Decimal, bool]]) -> None:
        amounts = [a for a, _ in generated]

        def money(a: Decimal, as_units: bool) -> Decimal | schema.MoneyUnits:
            # the collector writes integers of the stored unit (schema.MoneyUnits), the rest Decimals
            return schema.MoneyUnits(int(a.scaleb(schema.MONEY_SCALE))) if as_units else a

        with engine.begin() as conn:
            conn.execute(delete(schema.results))
            conn.execute(delete(schema.events))
            # COPY on PostgreSQL, multi-row upserts on SQLite: the collector's own write path
            warehouse.upsert(
                conn,
                [result_row(i, money(a, u), money(a * 2, u)) for i, (a, u) in enumerate(generated)],
            )
            tally = events.Tally()
            for a in amounts:
                tally.add("succeeded", "default", None, 1, cost_usd=a, standard_cost_usd=a * 2)
            tally.flush(conn, NOW, None)
        with engine.connect() as conn:
            stored = conn.execute(
                select(schema.results.c.cost_usd).order_by(schema.results.c.queue_id)
            ).scalars()
            assert list(stored) == amounts
            total = conn.execute(select(func.sum(schema.results.c.cost_usd))).scalar_one()
            assert total == sum(amounts, Decimal(0))
            summary = events.summary_since(conn, None)
            assert summary[0]["cost_usd"] == sum(amounts, Decimal(0))
            assert summary[0]["standard_cost_usd"] == 2 * sum(amounts, Decimal(0))

    try:
        check()
    finally:
        engine.dispose()


def test_migration_0005_converts_float_costs_to_their_decimal_values(db_url: str) -> None:
    engine = make_engine(db_url)
    cfg = migrate._alembic_config("both")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    floats = [0.0041086, 0.1, 1e-10, 12.3456789012, 0.0]
    with engine.begin() as conn:
        for i, value in enumerate(floats):
            conn.execute(
                text(
                    "INSERT INTO etl_results (doc_key, task, queue_id, custom_id, cost_usd, standard_cost_usd,"
                    " batch_id, collected_at) VALUES (:k, 'default', :i, :c, :v, :s, 'b', :at)"
                ),
                {
                    "k": f"k{i}",
                    "i": i,
                    "c": f"q{i}",
                    "v": value,
                    "s": value * 2,
                    "at": NOW.replace(tzinfo=None),
                },
            )
            conn.execute(
                text(
                    "INSERT INTO etl_events (at, kind, documents, cost_usd, standard_cost_usd) VALUES (:at, 'succeeded', 1, :v, :s)"
                ),
                {"at": NOW.replace(tzinfo=None), "v": value, "s": value * 2},
            )
        body = {
            "tokens_and_cost": {
                "cost_usd": 0.0041086,
                "standard_cost_usd": 0.0082172,
                "savings_usd": 0.0041086,
            }
        }
        conn.execute(
            text("INSERT INTO etl_reports (created_at, body) VALUES (:at, :b)"),
            {"at": NOW.replace(tzinfo=None), "b": json.dumps(body)},
        )
    migrate.upgrade(engine, engine)
    migrate.check(engine, engine)
    expected = [Decimal(repr(v)) for v in floats]
    with engine.connect() as conn:
        got = (
            conn.execute(select(schema.results.c.cost_usd).order_by(schema.results.c.queue_id))
            .scalars()
            .all()
        )
        assert got == expected
        assert conn.execute(select(func.sum(schema.events.c.cost_usd))).scalar_one() == sum(
            expected, Decimal(0)
        )
        saved = events.last_report(conn)
    assert saved is not None
    assert saved[1]["tokens_and_cost"]["cost_usd"] == "0.0041086000"
    engine.dispose()


AWARE = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
) | st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.builds(
        lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-14 * 60 + 1, 14 * 60 - 1)
    ),
)
NAIVE = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1))  # read as UTC


def test_timestamps_round_trip_to_the_microsecond_through_the_bulk_write_paths(db_url: str) -> None:
    """The collector's write path hands COPY its timestamps as text (`clock.isoformat`, UTC as `Z`), SQLite
    the column's own processor: any instant, with any offset or none (UTC), reads back as the same
    instant in UTC, to the microsecond."""
    engine = make_engine(db_url)
    migrate.upgrade(engine, engine)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(AWARE | NAIVE, AWARE | NAIVE, AWARE | NAIVE), min_size=1, max_size=30))
    def check(generated: list[tuple[datetime, datetime, datetime]]) -> None:
        rows = []
        for i, (enqueued, ended, collected) in enumerate(generated):
            row = result_row(i, Decimal(0), Decimal(0))
            row.update(enqueued_at=enqueued, batch_ended_at=ended, collected_at=collected)
            rows.append(row)
        with engine.begin() as conn:
            # a session zone that is not UTC: the text must carry its offset
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL TIME ZONE 'Asia/Kathmandu'")
            conn.execute(delete(schema.results))
            warehouse.upsert(conn, rows)
        r = schema.results.c
        with engine.connect() as conn:
            stored = conn.execute(
                select(r.enqueued_at, r.batch_ended_at, r.collected_at).order_by(r.queue_id)
            ).all()
        assert [tuple(s) for s in stored] == [tuple(map(ensure_utc, g)) for g in generated]

    try:
        check()
    finally:
        engine.dispose()
