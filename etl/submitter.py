"""The nightly job: claim queued rows, build batches within the API limits, send each create once.

Order of every batch, each step durable before the next (see README "What survives what"):
claim rows into an intent -> build and validate (rejects written) -> fence (`sending`) ->
create with max_retries=0 -> record the batch id -> rows `submitted`.
An ambiguous create leaves the intent `unknown` for the reconciler; it is never sent again.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete

from etl import failpoints, reconciler
from etl.errors import ProviderError, SubmissionPaused
from etl.prompt import BODY_OVERHEAD, Rejection, batch_body, build_params, encode_request
from etl.runtime import Runtime, gc_paused
from etl.schema import BatchStatus, batches
from etl.store import batches as intents
from etl.store import events, state
from etl.store import queue as q
from etl.store.engine import reading

log = structlog.get_logger("etl.submit")


@dataclass
class SubmitOutcome:
    batches: int = 0
    documents: int = 0
    rejected: int = 0
    payload_bytes: int = 0
    unknown: int = 0
    stopped: str | None = None
    batch_ids: list[str] = field(default_factory=list)


def run(rt: Runtime) -> SubmitOutcome:
    """Submit everything queued (up to `submit.max_batches_per_run` batches)."""
    with rt.engine.begin() as conn:
        paused = state.pause_reason(conn)
    if paused:
        raise SubmissionPaused(f"submission is paused: {paused}. Fix the cause, then run: etl resume")
    # The first claim (an UPDATE of up to 100,000 rows: seconds of database work) runs while the SDK
    # loads on a thread; the API's part of reconciliation follows it, before anything is sent.
    rt.warm_provider()
    reconciled = reconciler.release_expired(rt)
    _supersede(rt)
    claim = _claim(rt)
    reconciler.match_remote(rt, reconciled)
    outcome = SubmitOutcome()
    limits = rt.config.submit
    while outcome.batches < limits.max_batches_per_run:
        if rt.should_stop():
            outcome.stopped = "stop requested"
            if claim is not None:  # claimed, never sent: back to the queue now rather than at lease expiry
                _give_back(rt, claim.intent_id, (BatchStatus.CLAIMED,), "submit stopped before building")
            break
        claim = claim or _claim(rt)
        if claim is None:
            break
        with gc_paused():  # a batch is 100,000 request dicts: no GC rescans while it is built
            if not _one_batch(rt, outcome, claim):
                break
        claim = None
    log.info(
        "submit_finished",
        batches=outcome.batches,
        documents=outcome.documents,
        rejected=outcome.rejected,
        unknown=outcome.unknown,
        stopped=outcome.stopped,
    )
    return outcome


@dataclass(frozen=True)
class Claim:
    intent_id: int
    at: datetime  # when the lease began


def _claim(rt: Runtime) -> Claim | None:
    """Take the next batch's rows under a new intent and lease; None when nothing is queued."""
    limits = rt.config.submit
    lease = timedelta(seconds=limits.claim_lease_seconds)
    now = rt.clock()
    with rt.engine.begin() as conn:
        intent_id = intents.create_intent(conn, rt.owner, now + lease, now)
        claimed = q.claim(conn, intent_id, limits.max_requests_per_batch, now)
        if claimed == 0:
            conn.execute(delete(batches).where(batches.c.id == intent_id))
            return None
    log.info("rows_claimed", intent=intent_id, rows=claimed)
    failpoints.hit("submit.after_claim")
    return Claim(intent_id, now)


def _supersede(rt: Runtime) -> None:
    """Older queued versions of a document are never sent: only the newest row's result would be kept."""
    with rt.engine.begin() as conn:
        n = q.supersede(conn, rt.clock())
    if n:
        log.warning("documents_superseded", rows=n, reason=q.SUPERSEDED_REASON)


def _give_back(rt: Runtime, intent_id: int, statuses: tuple[str, ...], reason: str) -> None:
    """An intent of ours that was never sent: released, its rows back in the queue with attempts untouched."""
    with rt.engine.begin() as conn:
        if intents.release(conn, intent_id, statuses, reason, batches.c.owner == rt.owner):
            q.unclaim(conn, intent_id, rt.clock())


def _one_batch(rt: Runtime, outcome: SubmitOutcome, claim: Claim) -> bool:
    """Build and send the batch of one claim. False when the run must stop."""
    limits = rt.config.submit
    lease = timedelta(seconds=limits.claim_lease_seconds)
    intent_id = claim.intent_id
    now = claim.at

    parts: list[bytes] = []
    size = BODY_OVERHEAD
    rejects: list[tuple[int, str]] = []
    overflow: list[int] = []
    per_task: Counter[str] = Counter()
    rejected_per_task: Counter[tuple[str, str]] = Counter()
    renew_at = now + lease / 3
    lease_until = now + lease
    with reading(rt.engine) as reader:
        for row in q.iter_claimed(reader, intent_id):
            try:
                params = build_params(row, rt.config.tasks, limits.max_body_bytes)
            except Rejection as rej:
                rejects.append((row.id, rej.reason))
                rejected_per_task[(row.task, rej.reason.split(":")[0][:80])] += 1
                continue
            encoded = encode_request(row.id, params)
            if BODY_OVERHEAD + len(encoded) > limits.max_batch_bytes:
                # Alone it would not fit in a batch: sending it can never work, and leaving it queued would
                # make every night claim and put it back.
                reason = (
                    f"request is {len(encoded):,} bytes with its prompt; a batch may hold "
                    f"{limits.max_batch_bytes:,} (submit.max_batch_bytes)"
                )
                rejects.append((row.id, reason))
                rejected_per_task[(row.task, "request larger than a batch")] += 1
                continue
            if size + len(encoded) + 1 > limits.max_batch_bytes:
                overflow.append(row.id)
                continue
            parts.append(encoded)
            size += len(encoded) + 1
            per_task[row.task] += 1
            if len(parts) % 1000 == 0 and rt.clock() >= renew_at:
                now = rt.clock()
                with rt.engine.begin() as conn:
                    if not intents.renew_lease(conn, intent_id, rt.owner, now, now + lease):
                        log.warning("claim_lost", intent=intent_id, reason="lease expired while building")
                        outcome.stopped = "lease lost"
                        return False
                renew_at = now + lease / 3
                lease_until = now + lease

    now = rt.clock()
    with rt.engine.begin() as conn:
        if rejects:
            q.reject(conn, intent_id, rejects, now)
            for (task, reason), n in rejected_per_task.items():
                events.record(conn, now, "rejected", task, n, reason)
        if overflow:
            q.unclaim(conn, intent_id, now, ids=overflow)
        if not intents.set_payload(conn, intent_id, rt.owner, len(parts), size):
            outcome.stopped = "lease lost"
            return False
        if not parts:
            intents.release(conn, intent_id, (BatchStatus.CLAIMED,), "no sendable rows")
    outcome.rejected += len(rejects)
    for row_id, reason in rejects:
        log.warning("document_rejected", queue_id=row_id, reason=reason)
    if not parts:
        return True
    body = batch_body(parts)
    del parts
    failpoints.hit("submit.after_build")

    with rt.engine.begin() as conn:
        if not intents.fence_sending(conn, intent_id, rt.owner, rt.clock()):
            log.warning("claim_lost", intent=intent_id, reason="another process took these rows over")
            outcome.stopped = "lease lost"
            return False
    failpoints.hit("submit.after_fence")
    if rt.clock() >= lease_until:
        # Paused between the fence and the call for longer than the lease: others may already treat this
        # intent as abandoned. We know it was never sent, so give the rows back instead of sending late.
        _give_back(
            rt,
            intent_id,
            (BatchStatus.SENDING, BatchStatus.UNKNOWN),
            "lease ran out before the create was sent",
        )
        log.warning("claim_lost", intent=intent_id, reason="lease ran out between fence and create; not sent")
        outcome.stopped = "lease lost"
        return False

    requests = sum(per_task.values())
    timer = _arm_during_create()
    try:
        remote = rt.provider.create_batch(body)
    except ProviderError as exc:
        _create_failed(rt, intent_id, exc, outcome)
        return False
    finally:
        if timer is not None:
            timer.cancel()
    failpoints.hit("submit.after_create")

    now = rt.clock()
    with rt.engine.begin() as conn:
        recorded = intents.record_submitted(conn, intent_id, remote, now)
        if recorded:
            q.mark_submitted(conn, intent_id, now)
            for task, n in per_task.items():
                events.record(conn, now, "submitted", task, n, batch_ref=intent_id)
    if not recorded:
        # A reconciler released this intent while we were paused: its rows may already be in another
        # batch. Cancel ours before it is processed (unprocessed requests are not billed).
        log.error("orphan_batch_canceled", intent=intent_id, batch_id=remote.id)
        try:
            rt.provider.cancel(remote.id)
        except ProviderError as exc:
            log.error("orphan_cancel_failed", batch_id=remote.id, error=str(exc))
        outcome.stopped = "lease lost"
        return False
    failpoints.hit("submit.after_record")
    outcome.batches += 1
    outcome.documents += requests
    outcome.payload_bytes += len(body)
    outcome.batch_ids.append(remote.id)
    log.info("batch_submitted", intent=intent_id, batch_id=remote.id, requests=requests, bytes=len(body))
    return True


def _arm_during_create() -> threading.Timer | None:
    """`submit.during_create`: die while the create call is in flight (tests pair it with a slow API)."""
    if not failpoints.armed("submit.during_create"):
        return None
    timer = threading.Timer(0.3, failpoints.hit, args=("submit.during_create",))
    timer.daemon = True
    timer.start()
    return timer


def _create_failed(rt: Runtime, intent_id: int, exc: ProviderError, outcome: SubmitOutcome) -> None:
    now = rt.clock()
    reason = str(exc)
    with rt.engine.begin() as conn:
        if exc.kind == "ambiguous":
            intents.mark_unknown(conn, intent_id, reason)
            outcome.unknown += 1
            outcome.stopped = "create outcome unknown"
            log.warning("create_ambiguous", intent=intent_id, error=reason)
            return
        intents.mark_failed(conn, intent_id, reason)
        if exc.kind == "systemic":
            q.unclaim(conn, intent_id, now, reason=f"not sent: {reason}")
            state.pause(conn, reason, now)
            outcome.stopped = f"paused: {reason}"
            log.error("submission_paused", intent=intent_id, reason=reason)
        elif exc.kind == "unreachable":  # no connection was made: the API never saw it, re-queued now
            q.unclaim(conn, intent_id, now, reason=f"not sent: {reason}")
            outcome.stopped = f"API unreachable: {reason}"
            log.warning("create_not_sent", intent=intent_id, error=reason)
        elif exc.kind in ("rate_limited", "transient", "not_found"):
            q.unclaim(conn, intent_id, now, reason=f"not sent yet: {reason}")
            outcome.stopped = f"rate limited: {reason}"
            log.warning("create_rate_limited", intent=intent_id, error=reason, retry_after=exc.retry_after)
        else:
            moved = q.fail_claimed(
                conn, intent_id, f"the API refused the batch: {reason}", now, rt.config.submit.max_attempts
            )
            outcome.stopped = f"create refused: {reason}"
            log.error("create_refused", intent=intent_id, error=reason, rows=moved)
