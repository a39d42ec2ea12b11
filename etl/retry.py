"""`etl retry`: send `dead` and `rejected` documents again, chosen by key, task, reason or time.

The rows go back to `queued` with their attempts reset; the reason they failed stays on the row after
"retried; was dead:" so the history is not lost. `--dry-run` shows what would be retried and changes
nothing. A rejected row whose cause was not fixed (say, its task still does not exist) is simply
rejected again at the next submit, with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from etl.config import Config
from etl.store import queue as q
from etl.store.databases import Databases
from etl.store.engine import reading

log = structlog.get_logger("etl.retry")

SAMPLE = 20


@dataclass(frozen=True)
class Selection:
    statuses: tuple[str, ...] = q.RETRYABLE
    doc_keys: tuple[str, ...] = ()
    task: str | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def narrowed(self) -> bool:
        return bool(self.doc_keys or self.task or self.reason or self.since or self.until)


@dataclass
class RetryOutcome:
    matched: int = 0
    retried: int = 0
    sample: list[dict[str, Any]] = field(default_factory=list)
    unconfigured: dict[str, int] = field(default_factory=dict)  # rows whose task is not in the config


def run(cfg: Config, db: Databases, now: datetime, sel: Selection, *, dry_run: bool) -> RetryOutcome:
    where = q.retry_filter(
        statuses=sel.statuses,
        doc_keys=sel.doc_keys,
        task=sel.task,
        reason=sel.reason,
        since=sel.since,
        until=sel.until,
    )
    out = RetryOutcome()
    with reading(db.main) as conn:
        out.matched = q.count_where(conn, where)
        out.sample = [
            {"queue_id": r.id, "doc_key": r.doc_key, "task": r.task, "status": r.status, "reason": r.reason}
            for r in q.retry_candidates(conn, where, SAMPLE)
        ]
        tasks = q.tasks_where(conn, where) if out.matched else {}
    out.unconfigured = {t: n for t, n in sorted(tasks.items()) if t not in cfg.tasks}
    if dry_run or out.matched == 0:
        return out
    with db.main.begin() as conn:
        out.retried = q.retry(conn, where, now)
    log.info(
        "documents_retried",
        documents=out.retried,
        doc_keys=[s["doc_key"] for s in out.sample],
        statuses=list(sel.statuses),
        task=sel.task,
        reason=sel.reason,
    )
    return out
