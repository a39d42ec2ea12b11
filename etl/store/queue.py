"""The queue table: claims, and every guarded transition of a document's status."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Connection,
    Select,
    Text,
    any_,
    bindparam,
    cast,
    func,
    select,
    type_coerce,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import NullType

from etl import codec
from etl.prompt import Row
from etl.store.dialect import capabilities
from etl.store.schema import OPEN_BATCH_STATUSES, BatchStatus, DocStatus, Mode, batches, instant, queue

S = DocStatus


def claim(
    conn: Connection,
    batch_ref: int,
    limit: int,
    now: datetime,
    *,
    exclude_tasks: Iterable[str] | None = None,
    live_cutoff: datetime | None = None,
) -> int:
    """Take up to `limit` queued rows into batch intent `batch_ref`. Concurrent claimers never overlap.

    With `live_cutoff`, rows routed to the live path (`live_routed`) are left for the live worker.

    PostgreSQL: `FOR UPDATE SKIP LOCKED` in a CTE, which PostgreSQL runs once. As a plain `IN (subquery)`
    the planner may pick a nested-loop semi join that re-runs the locking subquery for every outer row;
    a re-run skips the rows this statement has already updated and takes the next ones, so a claim of 2
    took all 5 queued rows (seen after issue 15's migration changed the plan). SQLite: the transaction is `BEGIN IMMEDIATE` (see engine), so
    claimers are serialised and the guarded `status = 'queued'` keeps them apart.

    Older queued versions of a document are superseded first, in the claim's own transaction: a claim never
    takes a row whose newer version is queued. A supersede run once before a submit's first claim did not
    cover its later claims (a newer version enqueued mid-run had both sent) nor another claimer's.
    (PostgreSQL: a row committed between the two statements can still slip past, a window of one statement.)
    """
    supersede(conn, now)
    where = [queue.c.status == S.QUEUED]
    if exclude_tasks:
        where.append(queue.c.task.not_in(sorted(exclude_tasks)))  # at their nightly cap
    picked = (
        select(queue.c.id)
        .where(*where, *_not_live(live_cutoff))
        .order_by(queue.c.priority.desc(), queue.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = conn.execute(
        update(queue)
        .where(queue.c.id.in_(_once(conn, picked)), queue.c.status == S.QUEUED)
        .values(status=S.CLAIMED, batch_ref=batch_ref, updated_at=now)
    )
    return int(result.rowcount)


def _once(conn: Connection, picked: Select[tuple[int]]) -> Any:
    """The locking pick as a CTE on PostgreSQL (run once; see `claim`). SQLite keeps the subquery: it
    does not re-run it, and pysqlite reports no row count for a statement that begins with WITH."""
    if capabilities(conn).skip_locked:
        cte = picked.cte("picked")
        return select(cte.c.id)
    return picked.scalar_subquery()


def _not_live(live_cutoff: datetime | None) -> list[ColumnElement[bool]]:
    """The batch's share of the queue: every row the live path does not take (see etl/routing.py)."""
    if live_cutoff is None:
        return []
    return [~live_routed(live_cutoff)]


def live_routed(cutoff: datetime) -> ColumnElement[bool]:
    """A queued row the live path takes: `mode = 'live'`, or no mode and a `due_by` before `cutoff`.

    `cutoff` is `routing.cutoff(...)`: the next submit slot plus the batch latency allowance. The SQL
    half of the rule stated in etl/routing.py; `routing.goes_live` is the same rule in Python.
    """
    # Every term is TRUE or FALSE, never NULL, so `NOT live_routed(...)` is exactly the batch's share.
    return (queue.c.mode.is_not(None) & (queue.c.mode == Mode.LIVE)) | (
        queue.c.mode.is_(None) & queue.c.due_by.is_not(None) & (instant(queue.c.due_by) < cutoff)
    )


SUPERSEDED_REASON = "a newer queued row of the same doc_key and task replaced it before it was sent"


def newest_of_duplicates(conn: Connection) -> dict[tuple[str, str], int]:
    """(doc_key, task) -> the newest queued id, for the keys queued more than once (usually none)."""
    groups = conn.execute(
        select(queue.c.doc_key, queue.c.task, func.max(queue.c.id))
        .where(queue.c.status == S.QUEUED)
        .group_by(queue.c.doc_key, queue.c.task)
        .having(func.count() > 1)
    ).all()
    return {(k, t): m for k, t, m in groups}


def supersede(conn: Connection, now: datetime) -> int:
    """Of the queued rows of one (doc_key, task), only the newest (highest id) may be sent: the older ones
    become `superseded` (never sent, never billed).

    One read-only aggregate over the queued rows finds the keys queued more than once (usually none); only
    then are their rows read and the older ones updated by id. A single `UPDATE ... WHERE id NOT IN
    (SELECT max(id) ... GROUP BY ...)` took three times as long at 100,000 queued rows (bench/supersede.py).
    """
    newest = newest_of_duplicates(conn)
    if not newest:
        return 0
    keys = sorted({k for k, _ in newest})
    if capabilities(conn).array_params:
        key_in = queue.c.doc_key == any_(bindparam("keys", keys, type_=ARRAY(Text)))
    else:
        values = func.json_each(bindparam("keys", json.dumps(keys))).table_valued("value")
        key_in = queue.c.doc_key.in_(select(values.c.value))
    rows = conn.execute(
        select(queue.c.id, queue.c.doc_key, queue.c.task).where(queue.c.status == S.QUEUED, key_in)
    )
    older = [r.id for r in rows if (r.doc_key, r.task) in newest and r.id < newest[(r.doc_key, r.task)]]
    done = 0
    for start in range(0, len(older), 10_000):
        ids = older[start : start + 10_000]
        result = conn.execute(
            update(queue)
            .where(_id_in(conn, ids), _is(conn, queue.c.status, S.QUEUED))
            .values(status=S.SUPERSEDED, reason=SUPERSEDED_REASON, updated_at=now)
        )
        done += int(result.rowcount)
    return done


def iter_claimed(conn: Connection, batch_ref: int, page: int = 2000) -> Iterator[Row]:
    """The rows of an intent in id order, streamed `page` rows at a time so memory does not grow with the batch.

    One query read through a server-side cursor (PostgreSQL) or the SQLite cursor, not keyset pages: a
    page query (`id > :last ... ORDER BY id LIMIT n`) is planned from statistics that still say "no row
    is claimed" right after a claim, so each page scanned and sorted the whole intent again (quadratic:
    7 s of a 100,000-row submit on PostgreSQL, against 0.4 s for the single query).
    """
    result = conn.execute(
        select(
            queue.c.id,
            queue.c.doc_key,
            queue.c.task,
            cast(queue.c.body, Text).label("body"),
            cast(queue.c.metadata, Text).label("metadata"),
        )
        .where(queue.c.batch_ref == batch_ref, queue.c.status == S.CLAIMED)
        .order_by(queue.c.id)
        .execution_options(yield_per=page)
    )
    with result:
        for r in result:
            yield Row(id=r.id, doc_key=r.doc_key, task=r.task, body=r.body, metadata=r.metadata)


def group_by_reason(items: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    """Row ids by their reason, for one guarded update per reason."""
    return _by_reason(items)


def iter_queued(
    conn: Connection,
    *,
    task: str | None = None,
    min_priority: int | None = None,
    enqueued_before: datetime | None = None,
    live_cutoff: datetime | None = None,
    page: int = 2000,
) -> Iterator[Row]:
    """Queued rows in the order a submit claims them (priority, then id), streamed; nothing is locked.

    As a submit sees them: of a (doc_key, task) queued more than once only the newest row, since the
    submit supersedes the older ones before it claims (`supersede`), and with `live_cutoff` none of the
    rows the live path takes (`live_routed`)."""
    newest = newest_of_duplicates(conn)
    stmt = select(
        queue.c.id,
        queue.c.doc_key,
        queue.c.task,
        cast(queue.c.body, Text).label("body"),
        cast(queue.c.metadata, Text).label("metadata"),
    ).where(queue.c.status == S.QUEUED, *_not_live(live_cutoff))
    if task is not None:
        stmt = stmt.where(queue.c.task == task)
    if min_priority is not None:
        stmt = stmt.where(queue.c.priority >= min_priority)
    if enqueued_before is not None:
        stmt = stmt.where(queue.c.enqueued_at <= enqueued_before)
    result = conn.execute(
        stmt.order_by(queue.c.priority.desc(), queue.c.id).execution_options(yield_per=page)
    )
    with result:
        for r in result:
            if newest and r.id < newest.get((r.doc_key, r.task), r.id):
                continue
            yield Row(id=r.id, doc_key=r.doc_key, task=r.task, body=r.body, metadata=r.metadata)


def mark_waiting(conn: Connection, reason: str, task: str | None, now: datetime) -> int:
    """Queued rows (of `task`, or all) that wait for a later night: the reason on the row, status untouched."""
    stmt = update(queue).where(
        queue.c.status == S.QUEUED, (queue.c.reason.is_(None)) | (queue.c.reason != reason)
    )
    if task is not None:
        stmt = stmt.where(queue.c.task == task)
    return int(conn.execute(stmt.values(reason=reason, updated_at=now)).rowcount)


def _by_reason(items: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for qid, reason in items:
        groups[reason].append(qid)
    return groups


def _id_in(conn: Connection, ids: list[int]) -> ColumnElement[bool]:
    """`etl_queue.id` is one of `ids`, as ONE bound parameter however many ids there are.

    PostgreSQL gets an array (`id = ANY(:ids)`), SQLite a JSON array (`id IN (SELECT value FROM
    json_each(:ids))`). The statement text stays the same for every chunk, so neither SQLAlchemy nor
    psycopg re-parses thousands of placeholders per statement, and PostgreSQL can reuse its plan.
    """
    if capabilities(conn).array_params:
        return queue.c.id == any_(bindparam("ids", ids, type_=ARRAY(BigInteger)))
    values = func.json_each(bindparam("ids", json.dumps(ids))).table_valued("value")
    return queue.c.id.in_(select(values.c.value))


def _is(conn: Connection, column: Any, value: Any) -> ColumnElement[bool]:
    """A guard that filters rows reached by id, never a way in to them.

    On PostgreSQL `IS NOT DISTINCT FROM` (the same as `=` for these NOT NULL values) is not indexable,
    so the planner always reaches the rows through the primary key. With `=`, statistics gathered while
    every row was still `queued` make `status = 'submitted'` (or `batch_ref = 7`) look like one row, and
    it scanned ix_etl_queue_claim instead: every row of the intent per chunk, quadratic (2.4 s per
    2,000-row chunk at 100,000 rows, measured; see bench/RESULTS.md).
    """
    if capabilities(conn).server:
        result: ColumnElement[bool] = column.is_not_distinct_from(value)
        return result
    result = column == value
    return result


def _guarded(conn: Connection, ids: list[int], batch_ref: int, expected: str, values: dict[str, Any]) -> int:
    if not ids:
        return 0
    result = conn.execute(
        update(queue)
        .where(
            _id_in(conn, ids),
            _is(conn, queue.c.batch_ref, batch_ref),
            _is(conn, queue.c.status, expected),
        )
        .values(**values)
    )
    return int(result.rowcount)


def _guarded_by_reason(
    conn: Connection, batch_ref: int, items: list[tuple[int, str]], expected: str, values: dict[str, Any]
) -> int:
    """One guarded update per distinct reason (a chunk has few), each row getting its own reason."""
    return sum(
        _guarded(conn, ids, batch_ref, expected, {**values, "reason": reason})
        for reason, ids in _by_reason(items).items()
    )


def reject(conn: Connection, batch_ref: int, items: list[tuple[int, str]], now: datetime) -> int:
    """Claimed rows that can never be sent: `rejected` with the reason, out of the intent."""
    return _guarded_by_reason(
        conn, batch_ref, items, S.CLAIMED, {"status": S.REJECTED, "batch_ref": None, "updated_at": now}
    )


def unclaim(
    conn: Connection, batch_ref: int, now: datetime, ids: list[int] | None = None, reason: str | None = None
) -> int:
    """Give claimed rows back to the queue, untouched attempts (they were never sent)."""
    values: dict[str, Any] = {"status": S.QUEUED, "batch_ref": None, "updated_at": now}
    if reason is not None:
        values["reason"] = reason
    if ids is not None:
        return _guarded(conn, ids, batch_ref, S.CLAIMED, values)
    result = conn.execute(
        update(queue).where(queue.c.batch_ref == batch_ref, queue.c.status == S.CLAIMED).values(**values)
    )
    return int(result.rowcount)


def mark_submitted(conn: Connection, batch_ref: int, now: datetime) -> int:
    result = conn.execute(
        update(queue)
        .where(queue.c.batch_ref == batch_ref, queue.c.status == S.CLAIMED)
        .values(status=S.SUBMITTED, updated_at=now, reason=None)
    )
    return int(result.rowcount)


def sent_rows(conn: Connection, batch_ref: int, *, packed: bool = False) -> Sequence[Sequence[Any]]:
    """Every row the intent sent: (id, doc_key, task, attempts, status, enqueued_at), in one read.

    `enqueued_at` is as the driver returns it, for the caller to convert once per distinct value
    (`schema.as_utc`): a bulk enqueue shares a few timestamps among 100,000 rows, and converting each
    row's was 0.4 s of a 1 s read (SQLite, bench/RESULTS.md).

    `packed` (SQLite): the rows come back as one JSON array built by the database, for a read that runs
    beside other Python work. `etl collect` reads its first batch's rows while the SDK is imported on
    another thread, and a row-by-row read hands the GIL back and forth with that import for every row
    (0.3-0.5 s more at 100,000 rows); one statement step and one `orjson` parse do not. Not the default:
    the 7 MB string and its parse, batch after batch, left the collect's peak RSS 24 % higher at
    1,000,000 results (bench/RESULTS.md). A row JSON cannot hold (a BLOB written by hand) falls back to
    the plain read.
    """
    columns = (
        queue.c.id,
        queue.c.doc_key,
        queue.c.task,
        queue.c.attempts,
        queue.c.status,
        type_coerce(queue.c.enqueued_at, NullType()),
    )
    where = queue.c.batch_ref == batch_ref
    if packed and not capabilities(conn).server:
        one_array = select(func.json_group_array(func.json_array(*columns))).where(where)
        try:
            rows: list[list[Any]] = codec.loads(conn.execute(one_array).scalar_one())
            return rows
        except (DBAPIError, ValueError):
            pass
    return conn.execute(select(*columns).where(where)).all()


def existing_ids(conn: Connection, ids: list[int]) -> set[int]:
    """Which of these queue ids exist (results for ids that do not were never sent by us)."""
    if not ids:
        return set()
    return {r[0] for r in conn.execute(select(queue.c.id).where(_id_in(conn, ids)))}


def mark_done(conn: Connection, batch_ref: int, ids: list[int], now: datetime) -> int:
    return _guarded(conn, ids, batch_ref, S.SUBMITTED, {"status": S.DONE, "reason": None, "updated_at": now})


def mark_done_noted(conn: Connection, batch_ref: int, items: list[tuple[int, str]], now: datetime) -> int:
    """Rows settled `done` with a reason kept: an answer stored without any text ("no text block: ...")."""
    return _guarded_by_reason(conn, batch_ref, items, S.SUBMITTED, {"status": S.DONE, "updated_at": now})


def requeue(
    conn: Connection, batch_ref: int, items: list[tuple[int, str]], now: datetime, *, count_attempt: bool
) -> int:
    """Sent rows that failed for a transient reason go back to `queued` (attempt counted or not)."""
    values: dict[str, Any] = {"status": S.QUEUED, "batch_ref": None, "updated_at": now}
    if count_attempt:
        values["attempts"] = queue.c.attempts + 1
    return _guarded_by_reason(conn, batch_ref, items, S.SUBMITTED, values)


def kill(conn: Connection, batch_ref: int, items: list[tuple[int, str]], now: datetime) -> int:
    """Sent rows that can never succeed (or ran out of attempts): `dead`, attempt counted, reason kept."""
    return _guarded_by_reason(
        conn,
        batch_ref,
        items,
        S.SUBMITTED,
        {"status": S.DEAD, "attempts": queue.c.attempts + 1, "updated_at": now},
    )


def requeue_all_submitted(conn: Connection, batch_ref: int, reason: str, now: datetime) -> int:
    result = conn.execute(
        update(queue)
        .where(queue.c.batch_ref == batch_ref, queue.c.status == S.SUBMITTED)
        .values(status=S.QUEUED, reason=reason, batch_ref=None, updated_at=now)
    )
    return int(result.rowcount)


def tasks_of(conn: Connection, batch_ref: int, status: str) -> dict[str, int]:
    """How many of an intent's rows in `status` each task has: the report counts what happens to a
    whole intent (released, adopted, archived) per task, like everything else."""
    rows = conn.execute(
        select(queue.c.task, func.count())
        .where(queue.c.batch_ref == batch_ref, queue.c.status == status)
        .group_by(queue.c.task)
    )
    return {str(r[0]): int(r[1]) for r in rows}


def counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(queue.c.status, func.count()).group_by(queue.c.status))
    out = {s.value: 0 for s in S}
    out.update({r[0]: int(r[1]) for r in rows})
    return out


def any_queued(conn: Connection) -> bool:
    """Whether any row is queued (one probe of the partial claim index)."""
    return conn.execute(select(queue.c.id).where(queue.c.status == S.QUEUED).limit(1)).first() is not None


def oldest_queued(conn: Connection) -> datetime | None:
    value: datetime | None = conn.execute(
        select(func.min(queue.c.enqueued_at)).where(queue.c.status == S.QUEUED)
    ).scalar_one_or_none()
    return value


def insert_documents(conn: Connection, docs: list[dict[str, Any]]) -> int:
    """Bulk insert for `etl enqueue` (plain SQL INSERTs do the same thing)."""
    if not docs:
        return 0
    # inline(): no `RETURNING id` for a one-row file, which would need SELECT, a right the producer lacks.
    stmt = (
        queue.insert()
        .inline()
        .values(
            doc_key=bindparam("doc_key"),
            body=bindparam("body"),
            task=bindparam("task"),
            metadata=bindparam("metadata"),
            priority=bindparam("priority"),
            due_by=bindparam("due_by", type_=queue.c.due_by.type),
            mode=bindparam("mode"),
        )
    )
    conn.execute(stmt, [{"due_by": None, "mode": None, **doc} for doc in docs])
    return len(docs)


def fail_claimed(conn: Connection, batch_ref: int, reason: str, now: datetime, max_attempts: int) -> int:
    """Claimed rows whose whole batch the API refused: an attempt is counted so a poison batch ends."""
    base = (queue.c.batch_ref == batch_ref) & (queue.c.status == S.CLAIMED)
    dead = conn.execute(
        update(queue)
        .where(base, queue.c.attempts + 1 >= max_attempts)
        .values(status=S.DEAD, reason=reason, attempts=queue.c.attempts + 1, updated_at=now)
    ).rowcount
    back = conn.execute(
        update(queue)
        .where(base)
        .values(status=S.QUEUED, reason=reason, attempts=queue.c.attempts + 1, batch_ref=None, updated_at=now)
    ).rowcount
    return int(dead) + int(back)


def stranded(conn: Connection) -> dict[str, int]:
    """Rows no process will ever move on: `submitted` with no open batch (sent, maybe billed, never to be
    collected) and `claimed` with no live intent. Counted by status; empty when there are none."""
    live_claim = (BatchStatus.CLAIMED.value, BatchStatus.SENDING.value, BatchStatus.UNKNOWN.value)
    intent = batches.alias("intent")
    rows = conn.execute(
        select(queue.c.status, func.count())
        .select_from(queue.outerjoin(intent, intent.c.id == queue.c.batch_ref))
        .where(
            (
                (queue.c.status == S.SUBMITTED)
                & (intent.c.id.is_(None) | intent.c.status.not_in(OPEN_BATCH_STATUSES))
            )
            | ((queue.c.status == S.CLAIMED) & (intent.c.id.is_(None) | intent.c.status.not_in(live_claim)))
        )
        .group_by(queue.c.status)
    )
    return {r[0]: int(r[1]) for r in rows}


def waiting_in_ended(conn: Connection) -> list[tuple[str, int, str | None]]:
    """Batches the API said have ended whose rows are still `submitted`: (batch id, rows, last error).
    A collect that got through settles every row of the batch, so any such row waits on a collect that
    failed, stopped or was never run after the batch was seen ended."""
    rows = conn.execute(
        select(batches.c.batch_id, func.count(), batches.c.error)
        .select_from(queue.join(batches, batches.c.id == queue.c.batch_ref))
        .where(queue.c.status == S.SUBMITTED, batches.c.status == BatchStatus.ENDED.value)
        .group_by(batches.c.id, batches.c.batch_id, batches.c.error)
        .order_by(batches.c.id)
    )
    return [(str(r[0]), int(r[1]), r[2]) for r in rows]


def batch_ref_of(conn: Connection, queue_id: int) -> int | None:
    """The batch intent a queue row currently belongs to."""
    value: int | None = conn.execute(
        select(queue.c.batch_ref).where(queue.c.id == queue_id)
    ).scalar_one_or_none()
    return value


def waiting_in(conn: Connection, batch_refs: list[int]) -> dict[int, int]:
    """Per intent, how many of its rows still wait for their result (`submitted`)."""
    if not batch_refs:
        return {}
    rows = conn.execute(
        select(queue.c.batch_ref, func.count())
        .where(queue.c.batch_ref.in_(batch_refs), queue.c.status == S.SUBMITTED)
        .group_by(queue.c.batch_ref)
    )
    return {r[0]: int(r[1]) for r in rows}


def ids_of(conn: Connection, batch_ref: int) -> set[int]:
    """The queue rows an intent holds now (an unknown intent's: exactly the rows its create sent)."""
    return {r[0] for r in conn.execute(select(queue.c.id).where(queue.c.batch_ref == batch_ref))}


def reattach_waiting(conn: Connection, batch_ref: int, ids: list[int], now: datetime) -> int:
    """Rows of a batch of ours found after its intent was released, still waiting in the queue (never
    sent again): they go back to that intent as `submitted`, to be collected from the batch that holds
    them. Guarded on `queued` with no batch, so a row claimed meanwhile by a submit is left alone."""
    if not ids:
        return 0
    result = conn.execute(
        update(queue)
        .where(_id_in(conn, ids), queue.c.status == S.QUEUED, queue.c.batch_ref.is_(None))
        .values(status=S.SUBMITTED, batch_ref=batch_ref, updated_at=now, reason=None)
    )
    return int(result.rowcount)


RETRYABLE = (S.DEAD.value, S.REJECTED.value)


def retry_filter(
    *,
    statuses: Sequence[str],
    doc_keys: Sequence[str] = (),
    task: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> ColumnElement[bool]:
    """Which `dead`/`rejected` rows an `etl retry` selects: every given selector must match.

    `reason` is a case-insensitive substring of the row's reason; `since`/`until` bound the time the row
    last changed (when it became dead or rejected).
    """
    cond: ColumnElement[bool] = queue.c.status.in_([s for s in statuses if s in RETRYABLE])
    if doc_keys:
        cond = cond & queue.c.doc_key.in_(list(doc_keys))
    if task is not None:
        cond = cond & (queue.c.task == task)
    if reason:
        cond = cond & func.lower(func.coalesce(queue.c.reason, "")).contains(reason.lower(), autoescape=True)
    if since is not None:
        cond = cond & (queue.c.updated_at >= since)
    if until is not None:
        cond = cond & (queue.c.updated_at < until)
    return cond


def retry_candidates(conn: Connection, where: ColumnElement[bool], limit: int) -> list[Any]:
    """Up to `limit` selected rows (id, doc_key, task, status, reason), oldest first, and the total."""
    return list(
        conn.execute(
            select(queue.c.id, queue.c.doc_key, queue.c.task, queue.c.status, queue.c.reason)
            .where(where)
            .order_by(queue.c.id)
            .limit(limit)
        )
    )


def tasks_where(conn: Connection, where: ColumnElement[bool]) -> dict[str, int]:
    """How many selected rows each task has."""
    rows = conn.execute(select(queue.c.task, func.count()).where(where).group_by(queue.c.task))
    return {str(r[0]): int(r[1]) for r in rows}


def count_where(conn: Connection, where: ColumnElement[bool]) -> int:
    return int(conn.execute(select(func.count()).select_from(queue).where(where)).scalar_one())


def retry(conn: Connection, where: ColumnElement[bool], now: datetime) -> int:
    """Selected dead/rejected rows back to `queued` with fresh attempts; the old reason is kept after
    "retried; was <status>:" so the history of the row stays readable. Guarded by the status filter."""
    result = conn.execute(
        update(queue)
        .where(where, queue.c.status.in_(RETRYABLE))
        .values(
            status=S.QUEUED,
            attempts=0,
            live_calls=0,
            batch_ref=None,
            updated_at=now,
            reason="retried; was " + queue.c.status + ": " + func.coalesce(queue.c.reason, ""),
        )
    )
    return int(result.rowcount)
