"""Reconciliation: settle every intent whose fate is not known, before any new batch is sent.

- `claimed` intents whose lease ran out (their process died before sending) are released.
- `sending` intents whose lease ran out (their process died mid-call) become `unknown`.
- `unknown` intents are matched against the API's batches and adopted when a batch is proven theirs;
  they are released back to the queue only when it is proven that no batch at the API holds their
  requests (see `match_remote`): a failed or partial read is "not known yet" and costs a delay, never
  a second bill.
- Remote batches that match no record are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from etl import failpoints, liveness
from etl.errors import EtlError, ProviderError
from etl.prompt import queue_id_of
from etl.remote import RemoteBatch
from etl.runtime import Runtime
from etl.schema import BatchStatus, DocStatus, batches
from etl.store import batches as intents
from etl.store import events, state
from etl.store import queue as q
from etl.store.batches import Intent
from etl.store.engine import reading

log = structlog.get_logger("etl.reconcile")

ORPHAN_LOOKBACK = timedelta(days=2)
# Past an intent's anchor the list is read on for this much of the API's own time, in case the API's
# clock stepped back between the anchor's create and ours (the list is newest first by creation).
ANCHOR_SLACK = timedelta(days=1)
# A list longer than this is not read to its end in one run: intents it did not reach wait (a delay).
MAX_LISTED = 20_000


@dataclass
class ReconcileOutcome:
    released_claims: int = 0
    adopted: int = 0
    released_unknown: int = 0
    still_unknown: int = 0
    unmatched_remote: list[str] = field(default_factory=list)
    paused: str | None = None  # a systemic answer (wrong key, billing) paused submission: its reason


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
    """The API's part: `unknown` intents matched against the API's batches (adopted, or released once it
    is proven that no batch holds their requests), and remote batches that match no record reported.

    The proof never compares our clock with the API's (docs/survival.md, "Ownership without clocks"):
    - how far down the list to read: every intent remembers the newest batch already recorded when it
      was fenced (`anchor_batch_id`). That batch reached the API before this intent's create, and the
      list is newest first, so once the list has been read past the anchor (and `ANCHOR_SLACK` of the
      API's own time beyond it), every batch the create could have made has been seen. Without an
      anchor the whole list is read.
    - whose a batch is: the candidates are the unrecorded batches of the intent's size above that point.
      An ended one is read: its first custom_id names a queue row, whose batch_ref is the intent that
      sent it. A read that fails or breaks proves nothing: the intent waits. A batch that has not ended
      cannot be read: the intent waits for it to end.
    - released: only when the list was read far enough, no candidate is left unexplained, and the grace
      period (on our own clock, measured against our own `sent_at`) has passed.
    """
    now = rt.clock()
    with reading(rt.engine) as conn:
        unknown = intents.with_status(conn, BatchStatus.UNKNOWN)
        known = intents.known_batch_ids(conn)

    grace = timedelta(seconds=rt.config.submit.reconcile_grace_seconds)
    settle = timedelta(seconds=rt.config.submit.dead_owner_settle_seconds)
    since = now - ORPHAN_LOOKBACK  # remote batches this recent that match no record are reported
    recent: list[RemoteBatch] = []
    candidates: dict[int, list[RemoteBatch]] = {i.id: [] for i in unknown}
    anchor_seen_at: dict[int, datetime] = {}  # intent -> the API's creation time of its anchor
    complete: set[int] = set()  # intents whose part of the list has been read in full
    try:
        listed = 0
        exhausted = True
        for r in rt.provider.list_batches():
            listed += 1
            if r.created_at >= since:
                recent.append(r)
            for i in unknown:
                if i.id in complete:
                    continue
                seen = anchor_seen_at.get(i.id)
                if seen is not None and r.created_at < seen - ANCHOR_SLACK:
                    complete.add(i.id)
                elif r.id == i.anchor_batch_id:
                    anchor_seen_at[i.id] = r.created_at
                elif r.id not in known and r.total == i.request_count:
                    candidates[i.id].append(r)
            if len(complete) == len(unknown) and r.created_at < since:
                exhausted = False
                break
            if listed >= MAX_LISTED:
                exhausted = False
                log.warning("reconcile_list_capped", listed=listed)
                break
        if exhausted:
            complete = {i.id for i in unknown}
    except ProviderError as exc:
        if exc.kind == "systemic":
            with rt.engine.begin() as conn:
                state.pause(conn, str(exc), now)
            out.paused = str(exc)
        log.warning("reconcile_list_failed", error=str(exc), unknown=len(unknown))
        out.still_unknown = len(unknown)
        return out
    failpoints.hit("reconcile.after_list")

    pending = {i.id: i for i in unknown}
    unexplained: dict[str, RemoteBatch] = {}  # candidates that could still be an unknown intent's batch

    # 1. Ended candidates are read: the first custom_id names a queue row, whose batch_ref is the intent
    #    that sent it. No guessing by time or size; a failed read leaves the batch unexplained.
    ordered = list({r.id: r for rs in candidates.values() for r in rs}.values())
    for r in ordered:
        if not r.ended or r.id in known:
            continue
        verdict, owner = _owner_of(rt, r)
        sender = pending.get(owner) if owner is not None else None
        if verdict == "unreadable":
            unexplained[r.id] = r
        elif sender is not None and sender.request_count == r.total:
            if _adopt(rt, out, sender, r, now, how="confirmed by its custom_ids"):
                known.add(r.id)
                del pending[sender.id]
            else:
                unexplained[r.id] = r
        else:
            log.warning("lookalike_batch_not_ours", batch_id=r.id, owner_intent=owner, proof=verdict)

    # 2. A candidate that has not ended cannot be read: whoever it could belong to waits until it ends
    #    (the collector reconciles before it collects, so an adopted batch is collected in the same run).
    #    Adopting it early by size alone was undone only by its results, and if our own batch was still
    #    hidden from the list, re-queuing after that undo would have sent the rows twice.
    for r in ordered:
        if not r.ended and r.id not in known:
            unexplained[r.id] = r

    # 3. Release only what is proven absent: list read far enough, nothing unexplained, grace over.
    for intent in pending.values():
        sent = intent.sent_at or intent.created_at
        waiting_for = [c.id for c in candidates[intent.id] if c.id in unexplained and c.id not in known]
        if intent.id not in complete:
            out.still_unknown += 1
            log.info("unknown_intent_waiting_for_list", intent=intent.id, anchor=intent.anchor_batch_id)
        elif waiting_for:
            out.still_unknown += 1
            log.info("unknown_intent_waiting_for_lookalike", intent=intent.id, batch_ids=waiting_for)
        elif now - sent > grace or liveness.settled_after_death(intent.owner, now, settle):
            # (a process known dead for `settle` has nothing in flight: see etl.liveness)
            reason = "batch create had an unknown outcome and no such batch appeared at the API; re-queued"
            with rt.engine.begin() as conn:
                if intents.release(conn, intent.id, (BatchStatus.UNKNOWN,), reason):
                    per_task = q.tasks_of(conn, intent.id, DocStatus.CLAIMED)
                    rows = q.unclaim(conn, intent.id, now, reason=reason)
                    events.record_tasks(conn, now, "released", per_task, reason, intent.id)
                    out.released_unknown += 1
                    log.warning("unknown_intent_released", intent=intent.id, rows=rows)
            failpoints.hit("reconcile.after_release")
        else:
            out.still_unknown += 1
            log.info(
                "unknown_intent_waiting", intent=intent.id, sent_at=str(sent), grace_s=grace.total_seconds()
            )

    out.unmatched_remote = [r.id for r in recent if r.id not in known]
    if out.unmatched_remote:
        # Said once per batch id: batches other tools made on the same account stay in the listing for days.
        with rt.engine.begin() as conn:
            new = state.first_seen(conn, "remote_batch_unmatched", out.unmatched_remote, now)
        if new:
            log.warning("remote_batches_unmatched", batch_ids=new[:20], count=len(new))
    return out


def release_not_before(intent: Intent, grace_seconds: float) -> datetime:
    """The earliest time (our clock) an unknown intent can be released; later if a batch could be its."""
    return (intent.sent_at or intent.created_at) + timedelta(seconds=grace_seconds)


def release_by_operator(rt: Runtime, intent_id: int) -> int:
    """`etl reconcile --release`: an unknown intent's rows back to the queue on the operator's word.

    If the API does hold a batch of these requests, they are billed twice. Returns the rows re-queued."""
    now = rt.clock()
    reason = "released by the operator (etl reconcile --release) while its create's outcome was unknown"
    with rt.engine.begin() as conn:
        intent = intents.get(conn, intent_id)
        if intent is None or intent.status != BatchStatus.UNKNOWN:
            what = "does not exist" if intent is None else f"is {intent.status}, not unknown"
            raise EtlError(
                f"intent {intent_id} {what}: only an intent whose create outcome is unknown is released"
            )
        if not intents.release(conn, intent_id, (BatchStatus.UNKNOWN,), reason):
            raise EtlError(f"intent {intent_id} changed while releasing it; run etl status")
        per_task = q.tasks_of(conn, intent_id, DocStatus.CLAIMED)
        rows = q.unclaim(conn, intent_id, now, reason=reason)
        events.record_tasks(conn, now, "released", per_task, "released by the operator", intent_id)
    log.warning("unknown_intent_released_by_operator", intent=intent_id, rows=rows)
    return rows


def _adopt(
    rt: Runtime, out: ReconcileOutcome, intent: Intent, r: RemoteBatch, now: datetime, how: str
) -> bool:
    with rt.engine.begin() as conn:
        if not intents.record_submitted(conn, intent.id, r, now, adopted=True):
            return False
        per_task = q.tasks_of(conn, intent.id, DocStatus.CLAIMED)
        rows = q.mark_submitted(conn, intent.id, now)
        events.record_tasks(conn, now, "submitted", per_task, "adopted after an ambiguous create", intent.id)
    out.adopted += 1
    log.info("unknown_intent_adopted", intent=intent.id, batch_id=r.id, rows=rows, how=how)
    failpoints.hit("reconcile.after_adopt")
    return True


def _owner_of(rt: Runtime, r: RemoteBatch) -> tuple[str, int | None]:
    """Who sent an ended batch, from its first result line.

    ("row", intent) when the line names a queue row of ours (intent: the row's batch_ref, None if the row
    is in no intent now); ("foreign", None) when the custom_id is not one this etl writes; ("unreadable",
    None) when the read failed, broke or gave no line: that proves nothing either way."""
    try:
        cid = rt.provider.first_result_custom_id(r.id, rt.config.collect.stream_timeout_seconds)
    except ProviderError as exc:
        log.warning("lookalike_results_unreadable", batch_id=r.id, error=str(exc))
        return "unreadable", None
    if cid is None:
        log.warning("lookalike_results_unreadable", batch_id=r.id, error="no readable first line")
        return "unreadable", None
    qid = queue_id_of(cid)
    if qid is None:
        return "foreign", None
    with reading(rt.engine) as conn:
        return "row", q.batch_ref_of(conn, qid)
