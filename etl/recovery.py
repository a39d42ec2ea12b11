"""What the daemon does about work left behind by a process that died (SIGKILL, OOM, host reset, watchdog).

The rules, in the order the daemon applies them (at start-up, then every `TICK_SECONDS` while the leader
has something pending, else every `IDLE_SECONDS`):

1. **Dead owners are known at once** (`owner_dead`, see `etl.liveness`): same host: pid gone, pid reused,
   or another boot; PostgreSQL: the owner's session advisory lock is free. Anything else: its lease runs out.
2. **A dead leader's lease is taken over at once** (`take_over_leader`), not after `leader_lease_seconds`.
3. **A run whose owner died is `crashed`** (`sweep`): it never shows `running` again.
4. **A dead owner's intents are settled now** (`sweep`): their lease ends, so the reconciler releases a
   `claimed` intent's rows and turns a `sending` one `unknown`; an `unknown` one is matched against the
   API (its batch adopted) or, with no match `submit.dead_owner_settle_seconds` after the death was seen,
   released back to the queue.
5. **The poll reconciles too** (`settle`): unsettled intents (`claimed`, `sending`, `unknown`) are handed
   to the reconciler by every poll and recovery tick, not only by the next submit.
6. **A slot is done when its job finished** (`due_reruns`): the latest slot of a job whose newest attempt
   `crashed` or was `interrupted` is re-run at once (attempt 2, 3... of the same slot); a submit that
   ended `partial` for a passing reason (429 on create, lost lease, creates awaiting reconciliation) is
   re-run with backoff (`schedule.retry_backoff_seconds` doubling up to `retry_backoff_max_seconds`), at
   once when the sweep gave rows back, until `schedule.retry_until` local time; then it is reported
   (`submit_retry_given_up`).
7. **One morning report per collect slot** (`report_written`): a re-run collect completes and writes the
   report unless that slot's report was already written before the crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import time as time_of_day

import structlog
from sqlalchemy import Connection

from etl import life, liveness, reconciler
from etl.api import Api
from etl.clock import ensure_utc
from etl.config import Config, ScheduleSettings
from etl.store import batches as intents
from etl.store import events, state
from etl.store.databases import Databases
from etl.store.engine import reading
from etl.store.schema import BatchStatus

log = structlog.get_logger("etl.recovery")

TICK_SECONDS = 5.0  # how often the leader applies these rules while something is pending
IDLE_SECONDS = 60.0  # ...and when nothing was at the last look (a few indexed SELECTs)
RERUN_AT_ONCE = ("crashed", "interrupted")
PASSING = ("rate limited", "lease lost", "create outcome unknown", "awaiting reconciliation", "not sent yet")
UNSETTLED = (BatchStatus.CLAIMED, BatchStatus.SENDING, BatchStatus.UNKNOWN)
_last_api_look = 0.0  # monotonic time of `settle`'s last call to the reconciler


def owner_dead(db: Databases, me: str, owner: str | None, now: datetime) -> bool:
    """Rule 1. True only when `owner` is known dead (never for ourselves, never on a guess).

    Its proof of life is asked first (etl.life): a held lock means alive, whatever /proc says; then
    /proc where its pid means what it means here (etl.liveness.local_verdict); a free lock that nothing
    local contradicts is death."""
    if not owner or owner == me:
        return False
    lock_free: bool | None = None
    if liveness.holds_lock(owner) and db.capabilities.advisory_locks:
        with db.main.begin() as conn:
            lock_free = state.owner_lock_free(conn, owner)
    elif liveness.holds_flock(owner):
        lock_free = life.owner_flock_free(db.main, owner)
    if lock_free is False:
        return False
    verdict = liveness.local_verdict(owner)
    if verdict is None and lock_free:
        verdict = False
    if verdict is False:
        liveness.note_dead(owner, now)
        return True
    return False


def take_over_leader(db: Databases, me: str, now: datetime, ttl: timedelta) -> bool:
    """Rule 2. Take the leader lease from a dead holder. True if we hold it now."""
    with reading(db.main) as conn:
        holder = state.lease_holder(conn, state.LEADER_KEY)
    if holder is None or not owner_dead(db, me, holder, now):
        return False
    with db.main.begin() as conn:
        took = state.take_lease(conn, state.LEADER_KEY, holder, me, now, ttl)
    if took:
        log.warning("leader_taken_over", dead_holder=holder, reason="the leader's process is gone")
    return took


@dataclass
class Sweep:
    crashed_runs: list[str] = field(default_factory=list)
    ended_leases: list[int] = field(default_factory=list)
    unsettled: int = 0
    dead_unknown: int = 0  # `unknown` intents of dead owners: settled within seconds, so look often


def sweep(db: Databases, me: str, now: datetime) -> Sweep:
    """Rules 3 and 4: runs of dead owners become `crashed`; intents of dead owners lose their lease now."""
    out = Sweep()
    with reading(db.main) as conn:
        running = state.running_runs(conn)
        unsettled = intents.with_status(conn, *UNSETTLED)
    out.unsettled = len(unsettled)
    dead: dict[str, bool] = {}

    def is_dead(owner: str | None) -> bool:
        if owner is None:
            return False
        if owner not in dead:
            dead[owner] = owner_dead(db, me, owner, now)
        return dead[owner]

    for run in running:
        if is_dead(run.host):
            with db.main.begin() as conn:
                if state.mark_crashed(conn, run.run_id, f"its process died ({run.host})", now):
                    out.crashed_runs.append(run.run_id)
                    log.warning("run_crashed", job=run.job, slot=run.slot.isoformat(), attempt=run.attempt)
    for intent in unsettled:
        if intent.status in (BatchStatus.CLAIMED, BatchStatus.SENDING) and is_dead(intent.owner):
            assert intent.owner is not None
            with db.main.begin() as conn:
                if intents.end_lease_of(conn, intent.id, intent.owner, now):
                    out.ended_leases.append(intent.id)
                    log.warning(
                        "dead_owner_intent", intent=intent.id, status=intent.status, owner=intent.owner
                    )
        elif intent.status == BatchStatus.UNKNOWN and is_dead(intent.owner):  # starts rule 4's settle clock
            out.dead_unknown += 1
    return out


def settle(
    cfg: Config,
    db: Databases,
    api: Api,
    me: str,
    clock: Callable[[], datetime],
    should_stop: Callable[[], bool],
) -> reconciler.ReconcileOutcome | None:
    """Rule 5. Hand unsettled intents to the reconciler (the API is only asked when there are some)."""
    global _last_api_look
    found = sweep(db, me, clock())
    if not found.unsettled:
        return None
    # The API is asked every tick only about a dead process's work; a live process's unknown create (its
    # grace is 30 minutes) is looked at once a minute, not 360 times.
    if not (found.ended_leases or found.dead_unknown) and time.monotonic() - _last_api_look < IDLE_SECONDS:
        return reconciler.ReconcileOutcome(still_unknown=found.unsettled)
    _last_api_look = time.monotonic()
    out = reconciler.run(cfg, db, api, clock, should_stop)
    if out.released_claims or out.released_unknown or out.adopted:
        log.info(
            "recovery_reconciled",
            released_claims=out.released_claims,
            adopted=out.adopted,
            released_unknown=out.released_unknown,
            still_unknown=out.still_unknown,
        )
    return out


def cutoff(sch: ScheduleSettings, slot: datetime) -> datetime:
    """The first `schedule.retry_until` local time after `slot` (as UTC)."""
    zone = sch.zone
    hh, mm = (int(x) for x in sch.retry_until.split(":"))
    local = slot.astimezone(zone)
    at = datetime.combine(local.date(), time_of_day(hh, mm), tzinfo=zone)
    if at <= local:
        at = datetime.combine(local.date() + timedelta(days=1), time_of_day(hh, mm), tzinfo=zone)
    return at.astimezone(slot.tzinfo)


def backoff(sch: ScheduleSettings, attempt: int) -> timedelta:
    return timedelta(
        seconds=min(sch.retry_backoff_seconds * 2 ** max(attempt - 1, 0), sch.retry_backoff_max_seconds)
    )


@dataclass(frozen=True)
class Rerun:
    job: str
    slot: datetime
    attempt: int  # the attempt number the re-run gets
    why: str


_given_up: set[tuple[str, datetime]] = set()


def due_reruns(
    sch: ScheduleSettings, db: Databases, now: datetime, jobs: tuple[str, ...], *, rows_returned: bool = False
) -> list[Rerun]:
    """Rule 6. Which slots to run again now. `rows_returned`: the sweep just gave rows back to the queue."""
    todo: list[Rerun] = []
    with reading(db.main) as conn:
        for job in jobs:
            last = state.latest_attempt(conn, job)
            if last is None or last.outcome == "running":
                continue
            retry = last.outcome in RERUN_AT_ONCE or (
                job == "submit"
                and last.outcome == "partial"
                and any(p in (last.detail or "") for p in PASSING)
            )
            if not retry:
                continue
            if job == "submit" and now >= cutoff(sch, last.slot):
                if (job, last.slot) not in _given_up:
                    _given_up.add((job, last.slot))
                    log.error(
                        "submit_retry_given_up",
                        slot=last.slot.isoformat(),
                        attempts=last.attempt,
                        outcome=last.outcome,
                        detail=last.detail,
                        retry_until=sch.retry_until,
                    )
                continue
            ended = last.ended_at or last.started_at
            at_once = last.outcome in RERUN_AT_ONCE and last.attempt < 3
            if not at_once and not rows_returned and now - ended < backoff(sch, last.attempt):
                continue
            held = state.creates_held_until(conn) if job == "submit" else None
            if held is not None and now < held:  # the API's retry-after: not before (cut-off still applies)
                continue
            todo.append(Rerun(job, last.slot, last.attempt + 1, f"attempt {last.attempt} {last.outcome}"))
    return todo


def rerun_possible(sch: ScheduleSettings, last: state.Run, now: datetime) -> bool:
    """Whether rule 6 will still re-run this crashed or interrupted run (at once or after its backoff):
    a submit's re-run must start before its slot's cut-off. What `etl status` promises, from the same rule."""
    if last.job != "submit":
        return True
    ended = last.ended_at or last.started_at
    earliest = ended if last.attempt < 3 else ended + backoff(sch, last.attempt)
    return max(now, earliest) < cutoff(sch, last.slot)


def retry_pending(sch: ScheduleSettings, db: Databases, now: datetime) -> bool:
    """A slot that rule 6 will re-run later (backoff not over yet): keep looking every tick."""
    with reading(db.main) as conn:
        last = state.latest_attempt(conn, "submit")
    return (
        last is not None
        and last.outcome == "partial"
        and any(p in (last.detail or "") for p in PASSING)
        and now < cutoff(sch, last.slot)
    )


def report_written(conn: Connection, slot: datetime) -> bool:
    """Rule 7: this collect slot's morning report exists already (written before a crash)."""
    last = events.last_report(conn)
    return last is not None and ensure_utc(last[0]) >= slot
