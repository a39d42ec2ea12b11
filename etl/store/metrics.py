"""The reads behind the metrics page (etl/metrics.py) that no other command makes.

Plain SELECTs on existing tables, grouped in the database, so a scrape costs a few aggregate queries
whatever the size of the queue (bench/metrics.py measures them at 1M rows).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, func, select

from etl.store.schema import batches, queue, runs


def queue_by_status_and_task(conn: Connection) -> list[tuple[str, str, int]]:
    """(status, task, rows) for every pair that has rows."""
    rows = conn.execute(
        select(queue.c.status, queue.c.task, func.count()).group_by(queue.c.status, queue.c.task)
    )
    return [(r[0], r[1], int(r[2])) for r in rows]


def batches_by_status(conn: Connection) -> dict[str, int]:
    """Batch intents per status (ix_etl_batches_status)."""
    rows = conn.execute(select(batches.c.status, func.count()).group_by(batches.c.status))
    return {r[0]: int(r[1]) for r in rows}


def last_success(conn: Connection) -> dict[str, datetime]:
    """When each job last ended `ok`."""
    rows = conn.execute(
        select(runs.c.job, func.max(runs.c.ended_at)).where(runs.c.outcome == "ok").group_by(runs.c.job)
    )
    return {r[0]: r[1] for r in rows if r[1] is not None}
