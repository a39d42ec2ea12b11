"""Batch intents: the durable record of every batch before, during and after its create call.

Every transition is a guarded UPDATE on the status it expects (and the owner and lease where two
processes could race); a caller that gets `False` back has lost the race and must not act.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, insert, select, update

from etl import prompt
from etl.remote import RemoteBatch
from etl.store.schema import OPEN_BATCH_STATUSES, BatchStatus, batches

B = BatchStatus


@dataclass(frozen=True)
class Intent:
    id: int
    batch_id: str | None
    status: str
    request_count: int
    created_at: datetime
    sent_at: datetime | None
    remote_created_at: datetime | None
    ended_at: datetime | None
    lease_expires_at: datetime | None
    owner: str | None
    processing_status: str | None
    request_counts: dict[str, int] | None
    adopted: bool
    error: str | None
    anchor_batch_id: str | None = None
    installation: str | None = None  # what its custom_ids carry; None: legacy `q<row>` ids

    def custom_id(self, queue_id: int) -> str:
        return prompt.custom_id(queue_id, self.installation, self.id)

    @property
    def results_expire_at(self) -> datetime | None:
        """Results vanish 29 days after the batch was *created* (not ended)."""
        return None if self.remote_created_at is None else self.remote_created_at + timedelta(days=29)


def _intent(row: RowMapping) -> Intent:
    return Intent(
        id=row["id"],
        batch_id=row["batch_id"],
        status=row["status"],
        request_count=row["request_count"],
        created_at=row["created_at"],
        sent_at=row["sent_at"],
        remote_created_at=row["remote_created_at"],
        ended_at=row["ended_at"],
        lease_expires_at=row["lease_expires_at"],
        owner=row["owner"],
        processing_status=row["processing_status"],
        request_counts=row["request_counts"],
        adopted=bool(row["adopted"]),
        error=row["error"],
        anchor_batch_id=row["anchor_batch_id"],
        installation=row["installation"],
    )


def create_intent(
    conn: Connection, owner: str, lease_until: datetime, now: datetime, installation: str | None = None
) -> int:
    result = conn.execute(
        insert(batches)
        .values(
            status=B.CLAIMED,
            owner=owner,
            lease_expires_at=lease_until,
            created_at=now,
            installation=installation,
        )
        .returning(batches.c.id)
    )
    return int(result.scalar_one())


def get(conn: Connection, intent_id: int) -> Intent | None:
    row = conn.execute(select(batches).where(batches.c.id == intent_id)).mappings().first()
    return None if row is None else _intent(row)


def with_status(conn: Connection, *statuses: str) -> list[Intent]:
    rows = conn.execute(
        select(batches).where(batches.c.status.in_(statuses)).order_by(batches.c.id)
    ).mappings()
    return [_intent(r) for r in rows]


def open_intents(conn: Connection) -> list[Intent]:
    return with_status(conn, *OPEN_BATCH_STATUSES)


def may_need_the_list(conn: Connection) -> bool:
    """An intent the API's part of reconciliation may have to look up: an unknown create, or a claim or a
    send whose lease may have run out (the database's part turns those into unknown creates)."""
    return bool(with_status(conn, B.UNKNOWN, B.CLAIMED, B.SENDING))


def known_batch_ids(conn: Connection) -> set[str]:
    return {r[0] for r in conn.execute(select(batches.c.batch_id).where(batches.c.batch_id.is_not(None)))}


def _transition(
    conn: Connection, intent_id: int, expected: tuple[str, ...], extra: Any = None, **values: Any
) -> bool:
    stmt = update(batches).where(batches.c.id == intent_id, batches.c.status.in_(expected))
    if extra is not None:
        stmt = stmt.where(extra)
    return conn.execute(stmt.values(**values)).rowcount == 1


def renew_lease(conn: Connection, intent_id: int, owner: str, now: datetime, until: datetime) -> bool:
    return _transition(
        conn,
        intent_id,
        (B.CLAIMED,),
        (batches.c.owner == owner) & (batches.c.lease_expires_at > now),
        lease_expires_at=until,
    )


def set_payload(conn: Connection, intent_id: int, owner: str, count: int, size: int) -> bool:
    return _transition(
        conn, intent_id, (B.CLAIMED,), batches.c.owner == owner, request_count=count, payload_bytes=size
    )


def newest_recorded(conn: Connection) -> str | None:
    """The batch id of the newest batch recorded here (by the API's own creation time)."""
    value: str | None = conn.execute(
        select(batches.c.batch_id)
        .where(batches.c.batch_id.is_not(None), batches.c.remote_created_at.is_not(None))
        .order_by(batches.c.remote_created_at.desc(), batches.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return value


def fence_sending(conn: Connection, intent_id: int, owner: str, now: datetime) -> bool:
    """The fence: only the owner, inside its lease, may move an intent to `sending`.

    It also remembers the newest batch already recorded (`anchor_batch_id`): that batch was created at
    the API before this intent's create can have been, whatever either clock says."""
    return _transition(
        conn,
        intent_id,
        (B.CLAIMED,),
        (batches.c.owner == owner) & (batches.c.lease_expires_at > now),
        status=B.SENDING,
        sent_at=now,
        anchor_batch_id=newest_recorded(conn),
    )


def _submitted(remote: RemoteBatch, now: datetime, *, adopted: bool, error: str | None) -> dict[str, Any]:
    """The columns of an intent that records its batch at the API."""
    return {
        "batch_id": remote.id,
        "status": B.SUBMITTED,
        "submitted_at": now,
        "remote_created_at": remote.created_at,
        "processing_status": remote.processing_status,
        "request_counts": remote.request_counts,
        "adopted": 1 if adopted else 0,
        "error": error,
        "lease_expires_at": None,
    }


def record_submitted(
    conn: Connection, intent_id: int, remote: RemoteBatch, now: datetime, *, adopted: bool = False
) -> bool:
    fields = _submitted(remote, now, adopted=adopted, error=None)
    return _transition(conn, intent_id, (B.SENDING, B.UNKNOWN), **fields)


def revive(conn: Connection, intent_id: int, remote: RemoteBatch, now: datetime, error: str) -> bool:
    """A batch of ours found at the API after its intent was released (or failed): the intent records it
    after all, so it is collected like any other (etl.reconciler, "unexplained batches")."""
    fields = _submitted(remote, now, adopted=True, error=error)
    return _transition(conn, intent_id, (B.RELEASED, B.FAILED), **fields)


def mark_unknown(conn: Connection, intent_id: int, error: str) -> bool:
    return _transition(conn, intent_id, (B.SENDING,), status=B.UNKNOWN, error=error)


def expire_sending(conn: Connection, now: datetime) -> list[int]:
    """`sending` intents whose owner's lease ran out died mid-call: their outcome is unknown."""
    rows = conn.execute(
        update(batches)
        .where(batches.c.status == B.SENDING, batches.c.lease_expires_at < now)
        .values(status=B.UNKNOWN, error="the process sending this batch stopped before recording the outcome")
        .returning(batches.c.id)
    )
    return [r[0] for r in rows]


def end_lease_of(conn: Connection, intent_id: int, owner: str, now: datetime) -> bool:
    """The owner of a `claimed`/`sending` intent is known dead: its lease ends now, so the reconciler's
    usual rules (release the claim, turn the send `unknown`) apply at once instead of at lease expiry.
    Guarded on the owner, so an intent taken over meanwhile is left alone."""
    return _transition(
        conn,
        intent_id,
        (B.CLAIMED, B.SENDING),
        (batches.c.owner == owner) & (batches.c.lease_expires_at >= now),
        lease_expires_at=now - timedelta(microseconds=1),
    )


def mark_failed(conn: Connection, intent_id: int, error: str) -> bool:
    return _transition(conn, intent_id, (B.SENDING,), status=B.FAILED, error=error)


def release(
    conn: Connection, intent_id: int, expected: tuple[str, ...], error: str, extra: Any = None
) -> bool:
    return _transition(conn, intent_id, expected, extra, status=B.RELEASED, error=error)


def expired_claims(conn: Connection, now: datetime) -> list[int]:
    rows = conn.execute(
        select(batches.c.id).where(batches.c.status == B.CLAIMED, batches.c.lease_expires_at < now)
    )
    return [r[0] for r in rows]


def update_remote(conn: Connection, intent_id: int, remote: RemoteBatch) -> bool:
    values: dict[str, Any] = {
        "processing_status": remote.processing_status,
        "request_counts": remote.request_counts,
        "remote_created_at": remote.created_at,
    }
    if remote.ended:
        values["status"] = B.ENDED
        values["ended_at"] = remote.ended_at
    return _transition(conn, intent_id, OPEN_BATCH_STATUSES, **values)


def mark_collected(conn: Connection, intent_id: int, now: datetime) -> bool:
    return _transition(conn, intent_id, OPEN_BATCH_STATUSES, status=B.COLLECTED, collected_at=now, error=None)


def mark_archived(conn: Connection, intent_id: int, error: str) -> bool:
    return _transition(conn, intent_id, OPEN_BATCH_STATUSES, status=B.ARCHIVED, error=error)


def note_error(conn: Connection, intent_id: int, error: str | None) -> None:
    conn.execute(update(batches).where(batches.c.id == intent_id).values(error=error))


def by_batch_id(conn: Connection, batch_id: str) -> Intent | None:
    row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).mappings().first()
    return None if row is None else _intent(row)
