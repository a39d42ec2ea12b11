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
from datetime import timedelta

import structlog

from etl import failpoints
from etl.errors import ProviderError
from etl.remote import RemoteBatch
from etl.runtime import Runtime
from etl.schema import BatchStatus, batches
from etl.store import batches as intents
from etl.store import events, state
from etl.store import queue as q

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
        unknown = intents.with_status(conn, BatchStatus.UNKNOWN)
        known = intents.known_batch_ids(conn)

    window = timedelta(seconds=rt.config.submit.reconcile_window_seconds)
    grace = timedelta(seconds=rt.config.submit.reconcile_grace_seconds)
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

    for intent in unknown:
        sent = intent.sent_at or intent.created_at
        candidates = [
            r
            for r in remote
            if r.id not in known
            and r.total == intent.request_count
            and sent - CLOCK_SKEW <= r.created_at <= sent + window
        ]
        if candidates:
            pick = _choose(candidates)
            with rt.engine.begin() as conn:
                if intents.record_submitted(conn, intent.id, pick, now, adopted=True):
                    rows = q.mark_submitted(conn, intent.id, now)
                    events.record(
                        conn, now, "submitted", None, rows, "adopted after an ambiguous create", intent.id
                    )
                    known.add(pick.id)
                    out.adopted += 1
                    log.info(
                        "unknown_intent_adopted",
                        intent=intent.id,
                        batch_id=pick.id,
                        rows=rows,
                        candidates=len(candidates),
                    )
            failpoints.hit("reconcile.after_adopt")
        elif now - sent > grace:
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
        log.warning(
            "remote_batches_unmatched", batch_ids=out.unmatched_remote[:20], count=len(out.unmatched_remote)
        )
    return out


def _choose(candidates: list[RemoteBatch]) -> RemoteBatch:
    """Several look alike (another process's batch of the same size): take the oldest, which is the one
    sent closest to our call; the collector's custom_id check catches a wrong pick."""
    return min(candidates, key=lambda r: r.created_at)
