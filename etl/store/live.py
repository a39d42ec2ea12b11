"""The live path's SQL: claims of urgent rows, the recorded call, each outcome, crash recovery, LISTEN.

A live row moves `queued -> calling -> done | dead | rejected`, or back to `queued` (fallback to the batch,
a systemic error, a crash). Every transition is guarded by `status = 'calling'` and its row count checked.
`call_started_at` is set, and committed, before each Messages call and cleared with its outcome: a row
found `calling` with it set after its worker died had a call in flight that may have been billed.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, Text, cast, func, select, text, update

from etl.prompt import Row
from etl.store.queue import _id_in, _once, live_routed
from etl.store.schema import LIVE_CANDIDATE, DocStatus, Mode, events, instant, queue

S = DocStatus
CHANNEL = "etl_live"  # the migration's trigger NOTIFYs here on an urgent INSERT (PostgreSQL)


@dataclass(frozen=True)
class LiveRow:
    row: Row
    attempts: int
    live_calls: int
    enqueued_at: datetime | None
    due_by: datetime | None


def _candidates(cutoff: datetime) -> Any:
    # The partial index's own predicate, spelled out, so both planners see that it covers the query.
    return select(queue.c.id).where(text(LIVE_CANDIDATE), queue.c.status == S.QUEUED, live_routed(cutoff))


def any_waiting(conn: Connection, cutoff: datetime) -> bool:
    """Is some urgent row waiting? One probe of the partial index (the idle poll's only query)."""
    return conn.execute(_candidates(cutoff).limit(1)).first() is not None


def claim(conn: Connection, cutoff: datetime, limit: int, now: datetime) -> list[LiveRow]:
    """Take up to `limit` urgent rows (`calling`), most urgent first. Concurrent claimers never overlap:
    `FOR UPDATE SKIP LOCKED` on PostgreSQL, the guarded `status = 'queued'` under SQLite's single writer."""
    picked = (
        _candidates(cutoff)
        .order_by(instant(queue.c.due_by).asc().nulls_first(), queue.c.priority.desc(), queue.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = conn.execute(
        update(queue)
        .where(queue.c.id.in_(_once(conn, picked)), queue.c.status == S.QUEUED)
        # The first call is on record with the claim's commit, before it can leave (`record_call` for
        # each further one); a row that is then not called (`fall_back`, `reject`) takes it off again.
        .values(status=S.CALLING, updated_at=now, call_started_at=now, live_calls=queue.c.live_calls + 1)
        .returning(
            queue.c.id,
            queue.c.doc_key,
            queue.c.task,
            cast(queue.c.body, Text),
            cast(queue.c.metadata, Text),
            queue.c.attempts,
            queue.c.live_calls,
            queue.c.enqueued_at,
            queue.c.due_by,
        )
    )
    return [
        LiveRow(Row(r[0], r[1], r[2], r[3], r[4]), int(r[5]), int(r[6]), r[7], r[8]) for r in result.all()
    ]


def _guarded(conn: Connection, queue_id: int, values: dict[str, Any]) -> bool:
    result = conn.execute(
        update(queue).where(queue.c.id == queue_id, queue.c.status == S.CALLING).values(**values)
    )
    return int(result.rowcount) == 1


def record_call(conn: Connection, queue_id: int, now: datetime) -> bool:
    """Before each Messages call: the call is on record (committed by the caller) before it leaves."""
    return _guarded(
        conn, queue_id, {"live_calls": queue.c.live_calls + 1, "call_started_at": now, "updated_at": now}
    )


def call_ended(conn: Connection, queue_id: int, now: datetime, *, count_attempt: bool) -> bool:
    """A call came back with an answer that bills nothing (429, 529...): no longer in flight."""
    values: dict[str, Any] = {"call_started_at": None, "updated_at": now}
    if count_attempt:
        values["attempts"] = queue.c.attempts + 1
    return _guarded(conn, queue_id, values)


def done(conn: Connection, queue_id: int, now: datetime) -> bool:
    return _guarded(
        conn, queue_id, {"status": S.DONE, "reason": None, "call_started_at": None, "updated_at": now}
    )


def dead(conn: Connection, queue_id: int, reason: str, now: datetime) -> bool:
    """Gave up: the API refused it, or it ran out of attempts. The attempt is counted, as in the batch."""
    return _guarded(
        conn,
        queue_id,
        {
            "status": S.DEAD,
            "reason": reason,
            "attempts": queue.c.attempts + 1,
            "call_started_at": None,
            "updated_at": now,
        },
    )


NOT_CALLED: dict[str, Any] = {"call_started_at": None, "live_calls": queue.c.live_calls - 1}


def reject(conn: Connection, queue_id: int, reason: str, now: datetime) -> bool:
    """Bad input, never sent (the call the claim put on record did not happen)."""
    return _guarded(conn, queue_id, {"status": S.REJECTED, "reason": reason, "updated_at": now, **NOT_CALLED})


def fall_back(conn: Connection, ids: Sequence[int], reason: str, now: datetime) -> int:
    """Urgent rows the live path will not take: to the next batch (`mode = 'batch'`), with the reason."""
    if not ids:
        return 0
    result = conn.execute(
        update(queue)
        .where(_id_in(conn, list(ids)), queue.c.status == S.CALLING)
        .values(status=S.QUEUED, mode=Mode.BATCH, reason=reason, updated_at=now, **NOT_CALLED)
    )
    return int(result.rowcount)


def give_back(
    conn: Connection, ids: Sequence[int], reason: str, now: datetime, *, uncalled: bool = False
) -> int:
    """Rows back to `queued` as they were (still urgent): a stop, a systemic error, a saturated API.
    `uncalled`: the call the claim put on record never left, so it is taken off again."""
    if not ids:
        return 0
    values: dict[str, Any] = dict(NOT_CALLED) if uncalled else {"call_started_at": None}
    result = conn.execute(
        update(queue)
        .where(_id_in(conn, list(ids)), queue.c.status == S.CALLING)
        .values(status=S.QUEUED, reason=reason, updated_at=now, **values)
    )
    return int(result.rowcount)


def renew(conn: Connection, ids: Sequence[int], now: datetime) -> int:
    """The worker is alive: its `calling` rows' lease (`updated_at`) starts again."""
    if not ids:
        return 0
    result = conn.execute(
        update(queue).where(_id_in(conn, list(ids)), queue.c.status == S.CALLING).values(updated_at=now)
    )
    return int(result.rowcount)


@dataclass(frozen=True)
class Recovered:
    id: int
    task: str
    in_flight: bool  # a call was on record without an outcome: it may have been billed


def recover(conn: Connection, now: datetime, lease: timedelta) -> list[Recovered]:
    """`calling` rows whose worker stopped renewing them (it died): back to `queued`, still urgent, so the
    live path calls again. Each one whose call was in flight is said to be possibly billed twice."""
    stale = conn.execute(
        select(queue.c.id, queue.c.task, queue.c.call_started_at)
        .where(queue.c.status == S.CALLING, queue.c.updated_at < now - lease)
        .with_for_update(skip_locked=True)
    ).all()
    out = []
    for qid, task, started in stale:
        in_flight = started is not None
        reason = (
            "live call interrupted (its process died mid-call); called again, possibly billed twice"
            if in_flight
            else "live claim abandoned by a process that died before calling; taken again"
        )
        result = conn.execute(
            update(queue)
            .where(queue.c.id == qid, queue.c.status == S.CALLING, queue.c.updated_at < now - lease)
            .values(status=S.QUEUED, reason=reason, call_started_at=None, updated_at=now)
        )
        if result.rowcount == 1:
            out.append(Recovered(int(qid), str(task), in_flight))
    return out


def stuck_calls(conn: Connection, now: datetime, lease: timedelta) -> int:
    """`calling` rows nobody renewed within the lease (for `etl status --check`)."""
    return int(
        conn.execute(
            select(func.count()).where(queue.c.status == S.CALLING, queue.c.updated_at < now - lease)
        ).scalar_one()
    )


def oldest_waiting(conn: Connection, cutoff: datetime) -> datetime | None:
    """When the longest-waiting urgent row was queued (or last put back), for `etl status --check`."""
    since = func.min(func.coalesce(queue.c.updated_at, queue.c.enqueued_at))
    value: datetime | None = conn.execute(
        select(since).where(text(LIVE_CANDIDATE), queue.c.status == S.QUEUED, live_routed(cutoff))
    ).scalar_one_or_none()
    return value


def spent_since(conn: Connection, since: datetime) -> Decimal:
    """Live spend (standard price) recorded since `since`: what the daily cap is checked against."""
    value = conn.execute(
        select(func.sum(events.c.cost_usd)).where(events.c.kind == "live_succeeded", events.c.at >= since)
    ).scalar_one_or_none()
    return Decimal(value) if value is not None else Decimal(0)


def listen(engine: Engine, timeout: float) -> Generator[bool, None, None]:
    """PostgreSQL: yield True for each NOTIFY on `CHANNEL`, False every `timeout` seconds without one.

    One connection kept for LISTEN alone (a pooled connection would lose the subscription). The
    generator ends when the caller closes it.
    """
    with engine.connect() as conn:
        conn.exec_driver_sql(f"LISTEN {CHANNEL}")
        conn.commit()
        driver: Any = conn.connection.driver_connection
        while True:
            got = False
            for _ in driver.notifies(timeout=timeout, stop_after=1):
                got = True
            yield got
