"""The routing rule has two halves: `routing.goes_live` in Python (the live path's and the estimate's view of
one row) and `queue.live_routed` in SQL (the submit's claim and the live path's take). They are proved
equal here over generated rows, written the way a producer writes them (plain SQL, ISO text with any
offset), on both databases: a row the claim leaves to the live path is exactly one the Python rule sends
live, so no row is taken by both paths or by neither."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, delete, select, text

from etl import routing
from etl.store import migrate
from etl.store import queue as q
from etl.store.schema import as_utc, queue

T0 = datetime(2026, 12, 4, 0, 0, tzinfo=UTC)
offsets = st.sampled_from([0, 60, 120, -300, 330, -720, 840]).map(lambda m: timezone(timedelta(minutes=m)))
# Milliseconds at most: the SQLite half compares text the user wrote at millisecond precision (instant()).
moments = st.builds(
    lambda s, ms: T0 + timedelta(seconds=s, milliseconds=ms),
    st.integers(-3 * 86400, 3 * 86400),
    st.sampled_from([0, 1, 999]),
)
styles = st.sampled_from(["T", " "])


@st.composite
def written(draw: st.DrawFn) -> str | None:
    """A `due_by` as a producer's INSERT writes it: NULL, or ISO text in some offset and style."""
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    when = draw(moments).astimezone(draw(offsets))
    iso = when.isoformat(sep=draw(styles), timespec=draw(st.sampled_from(["seconds", "milliseconds"])))
    return iso.replace("+00:00", "Z") if draw(st.booleans()) else iso


rows = st.lists(st.tuples(st.sampled_from([None, "live", "batch"]), written()), min_size=1, max_size=12)


def _routed_by_sql(engine: Engine, cutoff: datetime) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(select(queue.c.id).where(q.live_routed(cutoff))).scalars())


def test_the_sql_rule_and_the_python_rule_route_every_row_alike(db_url: str) -> None:
    engine = create_engine(db_url)
    migrate.upgrade(engine, engine)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batch=rows, cutoff=moments)
    def check(batch: list[tuple[str | None, str | None]], cutoff: datetime) -> None:
        with engine.begin() as conn:
            conn.execute(delete(queue))
            for i, (mode, due_by) in enumerate(batch):
                conn.execute(
                    text("INSERT INTO etl_queue (doc_key, body, mode, due_by) VALUES (:k, 'b', :m, :d)"),
                    {"k": f"d{i}", "m": mode, "d": due_by},
                )
            stored = conn.execute(select(queue.c.id, queue.c.mode, queue.c.due_by)).all()
        by_python = {r.id for r in stored if routing.goes_live(r.mode, as_utc(r.due_by), cutoff)}
        assert _routed_by_sql(engine, cutoff) == by_python

    try:
        check()
    finally:
        engine.dispose()
