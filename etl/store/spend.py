"""The nightly budget's table `etl_spend`: what each batch was estimated to cost before it was sent.

A reservation counts against its night unless its batch never reached the API (`released`, `failed`):
the sum lives in the database, so neither a crash nor a second daemon can lose or double it. Reservations
are made under `lock`, which serialises them: PostgreSQL an advisory transaction lock, SQLite the
`BEGIN IMMEDIATE` every write transaction already takes (see engine).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, func, insert, select, text

from etl.store.dialect import capabilities
from etl.store.schema import BatchStatus, DocStatus, batches, events, queue, spend

NOT_SENT = (BatchStatus.RELEASED.value, BatchStatus.FAILED.value)
LOCK_KEY = 0x6574_6C5F_7370  # "etl_sp": the advisory lock of budget reservations


@dataclass(frozen=True)
class Reservation:
    """One task's share of a batch about to be sent."""

    task: str
    model: str
    documents: int
    input_tokens: int
    max_output_tokens: int
    estimated_usd: Decimal  # the estimate as `etl estimate` prints it (caching as expected)
    reserved_usd: Decimal  # the upper bound the cap counts (every cacheable prefix written)


def lock(conn: Connection) -> None:
    """Hold the budget until this transaction ends (PostgreSQL; SQLite is serialised already)."""
    if capabilities(conn).advisory_locks:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})


def reserved(conn: Connection, night: str) -> dict[str, Decimal]:
    """Per task, the upper bound reserved on `night` by batches that reached (or may have reached) the API."""
    rows = conn.execute(
        select(spend.c.task, func.sum(spend.c.reserved_usd))
        .join(batches, batches.c.id == spend.c.batch_ref)
        .where(spend.c.night == night, batches.c.status.not_in(NOT_SENT))
        .group_by(spend.c.task)
    )
    return {task: Decimal(total or 0) for task, total in rows}


def night_summary(conn: Connection, night: str) -> dict[str, dict[str, Any]]:
    """Per task, what was sent on `night`: documents, the estimate and the upper bound reserved."""
    rows = conn.execute(
        select(
            spend.c.task,
            func.sum(spend.c.documents),
            func.sum(spend.c.estimated_usd),
            func.sum(spend.c.reserved_usd),
        )
        .join(batches, batches.c.id == spend.c.batch_ref)
        .where(spend.c.night == night, batches.c.status.not_in(NOT_SENT))
        .group_by(spend.c.task)
    )
    return {
        task: {"documents": int(docs or 0), "estimated": Decimal(est or 0), "reserved": Decimal(res or 0)}
        for task, docs, est, res in rows
    }


def reserve(
    conn: Connection, batch_ref: int, night: str, shares: Iterable[Reservation], now: datetime
) -> None:
    conn.execute(
        insert(spend),
        [
            {
                "batch_ref": batch_ref,
                "night": night,
                "task": s.task,
                "model": s.model,
                "documents": s.documents,
                "input_tokens": s.input_tokens,
                "max_output_tokens": s.max_output_tokens,
                "estimated_usd": s.estimated_usd,
                "reserved_usd": s.reserved_usd,
                "created_at": now,
            }
            for s in shares
        ],
    )


def estimates_of_collected(conn: Connection, since: datetime | None) -> dict[str, dict[str, Any]]:
    """Per task, the estimates of the batches collected since `since` and what the API charged for them.

    Both sides cover the same batches, so actual / estimate says how good the estimate was.
    """
    collected = select(batches.c.id).where(batches.c.status == BatchStatus.COLLECTED)
    if since is not None:
        collected = collected.where(batches.c.collected_at > since)
    ids = collected.scalar_subquery()
    out: dict[str, dict[str, Any]] = {}
    for task, model, docs, estimated in conn.execute(
        select(
            spend.c.task,
            func.min(spend.c.model),
            func.sum(spend.c.documents),
            func.sum(spend.c.estimated_usd),
        )
        .where(spend.c.batch_ref.in_(ids))
        .group_by(spend.c.task)
    ):
        out[task] = {
            "model": model,
            "documents": int(docs or 0),
            "estimated_usd": Decimal(estimated or 0),
            "actual_usd": Decimal(0),
        }
    for task, cost in conn.execute(
        select(events.c.task, func.sum(events.c.cost_usd))
        .where(events.c.kind == "succeeded", events.c.batch_ref.in_(ids))
        .group_by(events.c.task)
    ):
        if task in out:
            out[task]["actual_usd"] = Decimal(cost or 0)
    return out


def waiting_for_budget(conn: Connection, reason_prefix: str) -> dict[str, int]:
    """Queued documents per task that a cap held back."""
    rows = conn.execute(
        select(queue.c.task, func.count())
        .where(queue.c.status == DocStatus.QUEUED, queue.c.reason.startswith(reason_prefix, autoescape=True))
        .group_by(queue.c.task)
    )
    return {task: int(n) for task, n in rows}
