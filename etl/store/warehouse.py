"""The warehouse table `etl_results`: idempotent bulk upserts, newest queue row wins."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite

from etl.schema import results

UPDATABLE = [c.name for c in results.columns if c.name not in ("doc_key", "task")]


def upsert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert or replace results keyed by (doc_key, task).

    A row only replaces one from an older or the same queue row (`queue_id`), so re-collecting a batch
    changes nothing, and a late result for an old version of a document never overwrites the new one.
    """
    if not rows:
        return
    dialect = conn.dialect.name
    ins = postgresql.insert(results) if dialect == "postgresql" else sqlite.insert(results)
    stmt = ins.on_conflict_do_update(
        index_elements=[results.c.doc_key, results.c.task],
        set_={name: ins.excluded[name] for name in UPDATABLE},
        where=results.c.queue_id <= ins.excluded.queue_id,
    )
    conn.execute(stmt, rows)


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(results)).scalar_one())
