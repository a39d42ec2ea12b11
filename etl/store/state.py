"""Small shared facts: the submission pause, the leader lease, and the record of job runs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, RowMapping, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from etl import liveness
from etl.store.schema import runs, state

PAUSE_KEY = "submission_paused"
LEADER_KEY = "leader"


def get_value(conn: Connection, key: str) -> str | None:
    row = conn.execute(select(state.c.value).where(state.c.key == key)).first()
    return None if row is None else row.value


def set_value(conn: Connection, key: str, value: str, now: datetime) -> None:
    """Write a small named fact (e.g. the estimator's last measured error)."""
    if conn.execute(update(state).where(state.c.key == key).values(value=value, updated_at=now)).rowcount:
        return
    try:
        with conn.begin_nested():
            conn.execute(insert(state).values(key=key, value=value, updated_at=now))
    except IntegrityError:
        conn.execute(update(state).where(state.c.key == key).values(value=value, updated_at=now))


def pause_reason(conn: Connection) -> str | None:
    row = conn.execute(select(state.c.value).where(state.c.key == PAUSE_KEY)).first()
    return None if row is None else row.value


CREATE_NOT_BEFORE_KEY = "create_not_before"


def hold_creates(conn: Connection, until: datetime, now: datetime) -> None:
    """The API answered a create with 429 and `retry-after`: no create before `until` (UTC), by any process."""
    set_value(conn, CREATE_NOT_BEFORE_KEY, until.astimezone(UTC).isoformat(), now)


def creates_held_until(conn: Connection) -> datetime | None:
    value = get_value(conn, CREATE_NOT_BEFORE_KEY)
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:  # written by hand: ignored rather than holding creates forever
        return None


def pause(conn: Connection, reason: str, now: datetime) -> None:
    """Record a systemic failure. The first reason is kept: it is the one a human must fix."""
    if pause_reason(conn) is None:
        try:
            with conn.begin_nested():
                conn.execute(insert(state).values(key=PAUSE_KEY, value=reason, updated_at=now))
        except IntegrityError:
            pass


def resume(conn: Connection) -> str | None:
    reason = pause_reason(conn)
    conn.execute(delete(state).where(state.c.key == PAUSE_KEY))
    return reason


def first_seen(conn: Connection, kind: str, names: list[str], now: datetime) -> list[str]:
    """Remember `names` under `kind` and return those not remembered before (in the given order).

    For warnings worth saying once per object, such as a batch another tool made on the same account:
    the next run, or another instance, does not say it again.
    """
    if not names:
        return []
    keys = {f"{kind}:{n}": n for n in names}
    known = {r[0] for r in conn.execute(select(state.c.key).where(state.c.key.in_(list(keys))))}
    new = [n for k, n in keys.items() if k not in known]
    for name in new:
        try:
            with conn.begin_nested():
                conn.execute(insert(state).values(key=f"{kind}:{name}", value=name, updated_at=now))
        except IntegrityError:  # another process remembered it first: it says it
            new.remove(name)
    return new


def remembered(conn: Connection, kind: str, names: list[str]) -> set[str]:
    """Which of `names` are remembered under `kind` (by `first_seen`)."""
    if not names:
        return set()
    keys = [f"{kind}:{n}" for n in names]
    return {r[0].split(":", 1)[1] for r in conn.execute(select(state.c.key).where(state.c.key.in_(keys)))}


def with_prefix(conn: Connection, kind: str) -> dict[str, str | None]:
    """Every fact stored under `kind:<name>`: name -> value."""
    rows = conn.execute(select(state.c.key, state.c.value).where(state.c.key.startswith(f"{kind}:")))
    return {r.key.split(":", 1)[1]: r.value for r in rows}


def forget(conn: Connection, key: str) -> bool:
    return conn.execute(delete(state).where(state.c.key == key)).rowcount == 1


def acquire_lease(conn: Connection, key: str, holder: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew a named lease (e.g. the scheduler's leadership). True if `holder` has it now."""
    until = now + ttl
    renewed = conn.execute(
        update(state)
        .where(state.c.key == key, (state.c.holder == holder) | (state.c.expires_at < now))
        .values(holder=holder, expires_at=until, updated_at=now)
    ).rowcount
    if renewed:
        return True
    try:
        with conn.begin_nested():
            conn.execute(insert(state).values(key=key, holder=holder, expires_at=until, updated_at=now))
        return True
    except IntegrityError:
        return False


def lease_holder(conn: Connection, key: str) -> str | None:
    row = conn.execute(select(state.c.holder).where(state.c.key == key)).first()
    return None if row is None else row.holder


def take_lease(conn: Connection, key: str, dead: str, holder: str, now: datetime, ttl: timedelta) -> bool:
    """Take over a lease from a holder known dead, at once: only if `dead` still holds it."""
    return (
        conn.execute(
            update(state)
            .where(state.c.key == key, state.c.holder == dead)
            .values(holder=holder, expires_at=now + ttl, updated_at=now)
        ).rowcount
        == 1
    )


def hold_owner_lock(conn: Connection, owner: str) -> bool:
    """PostgreSQL: take the session advisory lock that says `owner` is alive, for this session's life."""
    return bool(
        conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": liveness.lock_key(owner)}).scalar()
    )


def owner_lock_free(conn: Connection, owner: str) -> bool:
    """PostgreSQL: True when no session holds `owner`'s lock, i.e. that owner's session is gone. Takes the
    lock for the current transaction only, so run it in a short transaction of its own."""
    return bool(
        conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": liveness.lock_key(owner)}).scalar()
    )


def release_lease(conn: Connection, key: str, holder: str) -> None:
    conn.execute(delete(state).where(state.c.key == key, state.c.holder == holder))


@dataclass(frozen=True)
class Run:
    job: str
    slot: datetime
    run_id: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    detail: str | None
    attempt: int = 1
    host: str | None = None


def _run(r: RowMapping) -> Run:
    return Run(
        r["job"],
        r["slot"],
        r["run_id"],
        r["started_at"],
        r["ended_at"],
        r["outcome"],
        r["detail"],
        r["attempt"],
        r["host"],
    )


def start_run(
    conn: Connection, job: str, slot: datetime, run_id: str, host: str, now: datetime, attempt: int = 1
) -> bool:
    """Claim attempt `attempt` of a (job, slot): False if any instance already ran or is running it."""
    try:
        with conn.begin_nested():
            conn.execute(
                insert(runs).values(
                    job=job,
                    slot=slot,
                    attempt=attempt,
                    run_id=run_id,
                    host=host,
                    started_at=now,
                    outcome="running",
                )
            )
        return True
    except IntegrityError:
        return False


def running_runs(conn: Connection) -> list[Run]:
    return [_run(r) for r in conn.execute(select(runs).where(runs.c.outcome == "running")).mappings()]


def mark_crashed(conn: Connection, run_id: str, detail: str, now: datetime) -> bool:
    """A run whose owner died: `crashed`, never `running` again. Guarded on `running`."""
    return (
        conn.execute(
            update(runs)
            .where(runs.c.run_id == run_id, runs.c.outcome == "running")
            .values(outcome="crashed", detail=detail, ended_at=now)
        ).rowcount
        == 1
    )


def latest_attempt(conn: Connection, job: str) -> Run | None:
    """The newest attempt of the job's newest slot."""
    row = (
        conn.execute(
            select(runs).where(runs.c.job == job).order_by(runs.c.slot.desc(), runs.c.attempt.desc()).limit(1)
        )
        .mappings()
        .first()
    )
    return None if row is None else _run(row)


def finish_run(conn: Connection, run_id: str, outcome: str, detail: str | None, now: datetime) -> None:
    conn.execute(
        update(runs).where(runs.c.run_id == run_id).values(outcome=outcome, detail=detail, ended_at=now)
    )


def last_runs(conn: Connection, limit: int = 10) -> list[Run]:
    rows = conn.execute(select(runs).order_by(runs.c.started_at.desc(), runs.c.id.desc()).limit(limit))
    return [_run(r) for r in rows.mappings()]


def last_slot(conn: Connection, job: str) -> datetime | None:
    row = conn.execute(
        select(runs.c.slot).where(runs.c.job == job).order_by(runs.c.slot.desc()).limit(1)
    ).first()
    return None if row is None else row.slot


INSTALLATION_KEY = "installation_id"


def installation_id(conn: Connection, now: datetime) -> str:
    """This database's installation id (created by `etl db upgrade`, or here on first use): 12 random hex
    digits that every custom_id of ours carries (etl.prompt.custom_id)."""
    value = get_value(conn, INSTALLATION_KEY)
    if value is not None:
        return value
    try:
        with conn.begin_nested():
            conn.execute(
                insert(state).values(key=INSTALLATION_KEY, value=secrets.token_hex(6), updated_at=now)
            )
    except IntegrityError:  # another process created it first: theirs is the one
        pass
    value = get_value(conn, INSTALLATION_KEY)
    assert value is not None
    return value
