"""Migration 0006 on a database that already holds work: rows keep today's behaviour, and it goes back."""

from __future__ import annotations

from alembic import command
from sqlalchemy import text

from etl.store import migrate
from etl.store.engine import make_engine


def _to(engine_url: str, revision: str, *, down: bool = False) -> None:
    engine = make_engine(engine_url)
    cfg = migrate._alembic_config("both")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
    engine.dispose()


def test_existing_rows_and_results_keep_todays_behaviour_after_0006_and_it_downgrades(db_url: str) -> None:
    _to(db_url, "0004")
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO etl_queue (doc_key, body) VALUES ('old', 'queued before the upgrade')")
        )
        conn.execute(
            text(
                "INSERT INTO etl_results (doc_key, task, queue_id, custom_id, batch_id, collected_at) "
                "VALUES ('done', 'default', 1, 'q1', 'msgbatch_1', CURRENT_TIMESTAMP)"
            )
        )
    _to(db_url, "head")
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, due_by, mode, live_calls, call_started_at FROM etl_queue")
        ).one()
        assert tuple(row) == ("queued", None, None, 0, None)
        assert conn.execute(text("SELECT mode FROM etl_results")).scalar_one() == "batch"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO etl_queue (doc_key, body, mode) VALUES ('u', 'urgent', 'live')"))
        conn.execute(text("UPDATE etl_queue SET status = 'calling' WHERE doc_key = 'u'"))
    engine.dispose()
    _to(db_url, "0004", down=True)  # a row caught mid-call goes back to the queue
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT doc_key, status FROM etl_queue")).all()) == {
            "old": "queued",
            "u": "queued",
        }
    engine.dispose()
