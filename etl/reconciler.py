"""Reconciliation: settle every intent whose fate is not known, before any new batch is sent.

- `claimed` intents whose lease ran out (their process died before sending) are released.
- `sending` intents whose lease ran out (their process died mid-call) become `unknown`.
- `unknown` intents are matched against the API's recent batches (created within a window after the
  intent was sent, same request count, not already ours) and adopted; once the grace period passes with
  no match they are released back to the queue: the API never had them, so they cost nothing.
- Remote batches that match no record are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from etl import failpoints, liveness
from etl.errors import ProviderError
from etl.prompt import queue_id_of
from etl.remote import RemoteBatch
from etl.runtime import Runtime
from etl.schema import BatchStatus, batches
from etl.store import batches as intents
from etl.store import events, state
from etl.store import queue as q
from etl.store.batches import Intent
from etl.store.engine import reading

log = structlog.get_logger("etl.reconcile")

CLOCK_SKEW = timedelta(minutes=5)
ORPHAN_LOOKBACK = timedelta(days=2)


@dataclass
class ReconcileOutcome:
    released_claims: int = 0
    adopted: int = 0
    released_unknown: int = 0
    still_unknown: int = 0
    unmatched_remote: list[str] = field(default_factory=list)


def run(rt: Runtime) -> ReconcileOutcome:
    out = release_expired(rt)
    return match_remote(rt, out)


def release_expired(rt: Runtime) -> ReconcileOutcome:
    """The database's part, no API call: expired claims go back to the queue, and sends whose process
    died become `unknown`. A submit does this before it claims, and `match_remote` after its first claim
    (while the claim runs, the SDK loads: `Runtime.warm_provider`)."""
    out = ReconcileOutcome()
    now = rt.clock()
    with rt.engine.begin() as conn:
        for intent_id in intents.expired_claims(conn, now):
            if intents.release(
                conn,
                intent_id,
                (BatchStatus.CLAIMED,),
                "claim lease expired before sending",
                batches.c.lease_expires_at < now,
            ):
                rows = q.unclaim(conn, intent_id, now)
                out.released_claims += 1
                log.warning("claim_expired_released", intent=intent_id, rows=rows)
        for intent_id in intents.expire_sending(conn, now):
            log.warning("sending_intent_orphaned", intent=intent_id)
    return out


def match_remote(rt: Runtime, out: ReconcileOutcome) -> ReconcileOutcome:
    """The API's part: `unknown` intents matched against the API's recent batches (adopted, or released
    once nothing could match them), and remote batches that match no record reported."""
    now = rt.clock()
    with reading(rt.engine) as conn:
        unknown = intents.with_status(conn, BatchStatus.UNKNOWN)
        known = intents.known_batch_ids(conn)

    window = timedelta(seconds=rt.config.submit.reconcile_window_seconds)
    grace = timedelta(seconds=rt.config.submit.reconcile_grace_seconds)
    settle = timedelta(seconds=rt.config.submit.dead_owner_settle_seconds)
    since = now - ORPHAN_LOOKBACK
    for intent in unknown:
        if intent.sent_at is not None:
            since = min(since, intent.sent_at - CLOCK_SKEW)
    try:
        remote = list(rt.provider.list_recent(since))
    except ProviderError as exc:
        if exc.kind == "systemic":
            with rt.engine.begin() as conn:
                state.pause(conn, str(exc), now)
        log.warning("reconcile_list_failed", error=str(exc), unknown=len(unknown))
        out.still_unknown = len(unknown)
        return out
    failpoints.hit("reconcile.after_list")

    def matches(intent: Intent, r: RemoteBatch) -> bool:
        sent = intent.sent_at or intent.created_at
        return (
            r.id not in known
            and r.total == intent.request_count
            and sent - CLOCK_SKEW <= r.created_at <= sent + window
        )

    # 1. Ended look-alikes are confirmed by their results: the first custom_id names a queue row, whose
    #    batch_ref is the intent that sent it. No guessing by time or size.
    pending = {i.id: i for i in unknown}
    lookalikes: list[RemoteBatch] = []
    for r in remote:
        if not any(matches(i, r) for i in pending.values()):
            continue
        if not r.ended:
            lookalikes.append(r)
            continue
        owner = _owner_of(rt, r)
        sender = pending.get(owner) if owner is not None else None
        if sender is not None and sender.request_count == r.total:
            if _adopt(rt, out, sender, r, now, how="confirmed by its custom_ids"):
                known.add(r.id)
                del pending[sender.id]
        else:
            log.warning("lookalike_batch_not_ours", batch_id=r.id, owner_intent=owner)

    # 2. A not-yet-ended look-alike is adopted early only when nothing else could claim it: exactly one
    #    unknown intent matches it and it is that intent's only candidate. Otherwise wait for it to end.
    for r in lookalikes:
        owners = [i for i in pending.values() if matches(i, r)]
        alone = len(owners) == 1 and [c.id for c in lookalikes if matches(owners[0], c)] == [r.id]
        if alone and _adopt(rt, out, owners[0], r, now, how="the only batch of its size and time"):
            known.add(r.id)
            del pending[owners[0].id]

    # 3. Release only what no batch at the API could still belong to.
    for intent in pending.values():
        sent = intent.sent_at or intent.created_at
        waiting_for = [r.id for r in lookalikes if r.id not in known and matches(intent, r)]
        if waiting_for:
            out.still_unknown += 1
            log.info("unknown_intent_waiting_for_lookalike", intent=intent.id, batch_ids=waiting_for)
        elif now - sent > grace or liveness.settled_after_death(intent.owner, now, settle):
            # (a process known dead for `settle` has nothing in flight: see etl.liveness)
            reason = "batch create had an unknown outcome and no such batch appeared at the API; re-queued"
            with rt.engine.begin() as conn:
                if intents.release(conn, intent.id, (BatchStatus.UNKNOWN,), reason):
                    rows = q.unclaim(conn, intent.id, now, reason=reason)
                    events.record(conn, now, "released", None, rows, reason, intent.id)
                    out.released_unknown += 1
                    log.warning("unknown_intent_released", intent=intent.id, rows=rows)
            failpoints.hit("reconcile.after_release")
        else:
            out.still_unknown += 1
            log.info(
                "unknown_intent_waiting", intent=intent.id, sent_at=str(sent), grace_s=grace.total_seconds()
            )

    out.unmatched_remote = [r.id for r in remote if r.id not in known]
    if out.unmatched_remote:
        # Said once per batch id: batches other tools made on the same account stay in the listing for days.
        with rt.engine.begin() as conn:
            new = state.first_seen(conn, "remote_batch_unmatched", out.unmatched_remote, now)
        if new:
            log.warning("remote_batches_unmatched", batch_ids=new[:20], count=len(new))
    return out


def _adopt(
    rt: Runtime, out: ReconcileOutcome, intent: Intent, r: RemoteBatch, now: datetime, how: str
) -> bool:
    with rt.engine.begin() as conn:
        if not intents.record_submitted(conn, intent.id, r, now, adopted=True):
            return False
        rows = q.mark_submitted(conn, intent.id, now)
        events.record(conn, now, "submitted", None, rows, "adopted after an ambiguous create", intent.id)
    out.adopted += 1
    log.info("unknown_intent_adopted", intent=intent.id, batch_id=r.id, rows=rows, how=how)
    failpoints.hit("reconcile.after_adopt")
    return True


def _owner_of(rt: Runtime, r: RemoteBatch) -> int | None:
    """The intent that sent an ended batch, read from its first result line (None if unreadable)."""
    try:
        cid = rt.provider.first_result_custom_id(r.id, rt.config.collect.stream_timeout_seconds)
    except ProviderError as exc:
        log.warning("lookalike_results_unreadable", batch_id=r.id, error=str(exc))
        return None
    qid = queue_id_of(cid) if cid else None
    if qid is None:
        return None
    with reading(rt.engine) as conn:
        return q.batch_ref_of(conn, qid)
