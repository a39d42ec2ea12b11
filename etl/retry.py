"""`etl retry`: send `dead` and `rejected` documents again, chosen by key, task, reason or time.

The rows go back to `queued` with their attempts reset; the reason they failed stays on the row after
"retried; was dead:" so the history is not lost. `--dry-run` shows what would be retried and changes
nothing. A rejected row whose cause was not fixed (say, its task still does not exist) is simply
rejected again at the next submit, with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from etl.errors import InputError
from etl.runtime import Runtime
from etl.store import queue as q
from etl.store.engine import reading

log = structlog.get_logger("etl.retry")

SAMPLE = 20
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime, option: str) -> datetime:
    """`2026-12-01`, `2026-12-01T06:00` (UTC unless it says otherwise) or a duration ago: `90m`, `24h`, `7d`."""
    m = _DURATION.match(text.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"{option} {text!r} is neither an ISO date/time (2026-12-01, 2026-12-01T06:00) nor a duration "
            "ago (90m, 24h, 7d)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


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


def run(rt: Runtime, sel: Selection, *, dry_run: bool) -> RetryOutcome:
    where = q.retry_filter(
        statuses=sel.statuses,
        doc_keys=sel.doc_keys,
        task=sel.task,
        reason=sel.reason,
        since=sel.since,
        until=sel.until,
    )
    out = RetryOutcome()
    with reading(rt.engine) as conn:
        out.matched = q.count_where(conn, where)
        out.sample = [
            {"queue_id": r.id, "doc_key": r.doc_key, "task": r.task, "status": r.status, "reason": r.reason}
            for r in q.retry_candidates(conn, where, SAMPLE)
        ]
    if dry_run or out.matched == 0:
        return out
    with rt.engine.begin() as conn:
        out.retried = q.retry(conn, where, rt.clock())
    log.info(
        "documents_retried",
        documents=out.retried,
        doc_keys=[s["doc_key"] for s in out.sample],
        statuses=list(sel.statuses),
        task=sel.task,
        reason=sel.reason,
    )
    return out
