"""Aggregated outcome events (one row per kind/task/reason per chunk, never per document) and reports."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, func, insert, select

from etl.store.schema import events, reports


@dataclass
class Tally:
    """Counts accumulated in memory for a chunk (or a batch), flushed as a handful of event rows."""

    rows: dict[tuple[str, str | None, str | None], dict[str, Any]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )

    def add(
        self, kind: str, task: str | None, reason: str | None = None, documents: int = 1, **amounts: Any
    ) -> None:
        """Counts are ints; money (`cost_usd`, `standard_cost_usd`) is Decimal."""
        acc = self.rows[(kind, task, reason)]
        acc["documents"] += documents
        for name, value in amounts.items():
            acc[name] += value

    def absorb(self, other: Tally) -> None:
        """Add `other`'s counts to these."""
        for key, amounts in other.rows.items():
            acc = self.rows[key]
            for name, value in amounts.items():
                acc[name] += value

    def flush(self, conn: Connection, now: datetime, batch_ref: int | None) -> None:
        if not self.rows:
            return
        conn.execute(
            insert(events),
            [
                {
                    "at": now,
                    "kind": kind,
                    "task": task,
                    "reason": reason,
                    "batch_ref": batch_ref,
                    "documents": int(acc.get("documents", 0)),
                    "input_tokens": int(acc.get("input_tokens", 0)),
                    "output_tokens": int(acc.get("output_tokens", 0)),
                    "cache_write_tokens": int(acc.get("cache_write_tokens", 0)),
                    "cache_read_tokens": int(acc.get("cache_read_tokens", 0)),
                    "cost_usd": Decimal(acc.get("cost_usd", 0)),
                    "standard_cost_usd": Decimal(acc.get("standard_cost_usd", 0)),
                }
                for (kind, task, reason), acc in self.rows.items()
            ],
        )
        self.rows.clear()


_PER_DOCUMENT = (
    (re.compile(r"^body is [\d,]+ bytes; the limit is"), "body is over the limit of"),
    (re.compile(r"^(metadata is not valid JSON): .*$"), r"\1"),
    (re.compile(r"^request is [\d,]+ bytes with its prompt"), "request with its prompt is too large"),
)


def reason_key(reason: str, limit: int = 300) -> str:
    """A row's reason as the report counts it: the whole sentence (never cut at a colon), with the parts
    that differ from document to document (a body's size, a JSON parser's position) left out, so equal
    causes are counted together."""
    for pattern, replacement in _PER_DOCUMENT:
        reason = pattern.sub(replacement, reason)
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def record_tasks(
    conn: Connection, now: datetime, kind: str, per_task: dict[str, int], reason: str, batch_ref: int
) -> None:
    """One event per task of a whole intent's rows (`queue.tasks_of`, read before they moved)."""
    tally = Tally()
    for task, documents in sorted(per_task.items()):
        tally.add(kind, task, reason, documents)
    tally.flush(conn, now, batch_ref)


def record(
    conn: Connection,
    now: datetime,
    kind: str,
    task: str | None,
    documents: int,
    reason: str | None = None,
    batch_ref: int | None = None,
) -> None:
    tally = Tally()
    tally.add(kind, task, reason, documents)
    tally.flush(conn, now, batch_ref)


def summary_since(conn: Connection, since: datetime | None) -> list[dict[str, Any]]:
    cols = [
        func.sum(events.c.documents).label("documents"),
        func.sum(events.c.input_tokens).label("input_tokens"),
        func.sum(events.c.output_tokens).label("output_tokens"),
        func.sum(events.c.cache_write_tokens).label("cache_write_tokens"),
        func.sum(events.c.cache_read_tokens).label("cache_read_tokens"),
        func.sum(events.c.cost_usd).label("cost_usd"),
        func.sum(events.c.standard_cost_usd).label("standard_cost_usd"),
    ]
    stmt = select(events.c.kind, events.c.task, events.c.reason, *cols).group_by(
        events.c.kind, events.c.task, events.c.reason
    )
    if since is not None:
        stmt = stmt.where(events.c.at > since)
    out = []
    for r in conn.execute(stmt):
        row = dict(r._mapping)
        for key in ("documents", "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens"):
            row[key] = int(row[key] or 0)  # PostgreSQL sums bigints as Decimal
        for key in ("cost_usd", "standard_cost_usd"):
            row[key] = Decimal(row[key] or 0)  # Money: Decimal on both databases
        out.append(row)
    return out


def save_report(conn: Connection, now: datetime, period_start: datetime | None, body: dict[str, Any]) -> None:
    conn.execute(insert(reports).values(created_at=now, period_start=period_start, body=body))


def last_report(conn: Connection) -> tuple[datetime, dict[str, Any]] | None:
    row = conn.execute(
        select(reports.c.created_at, reports.c.body).order_by(reports.c.id.desc()).limit(1)
    ).first()
    return None if row is None else (row.created_at, row.body)
