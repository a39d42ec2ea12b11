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

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from etl import failpoints, liveness
from etl.api import Api
from etl.clock import never, utcnow
from etl.config import Config
from etl.errors import EtlError, ProviderError
from etl.prompt import SentId, parse_custom_id
from etl.remote import RemoteBatch
from etl.store import batches as intents
from etl.store import databases, events, state
from etl.store import queue as q
from etl.store.batches import Intent
from etl.store.databases import Databases
from etl.store.engine import reading
from etl.store.schema import BatchStatus, DocStatus, batches

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


@dataclass(frozen=True)
class _Ctx:
    """What one reconciliation uses, as its caller gave it (nothing here changes while it runs)."""

    config: Config
    db: Databases
    api: Api
    clock: Callable[[], datetime]
    should_stop: Callable[[], bool]


def run(
    cfg: Config,
    db: Databases,
    api: Api,
    clock: Callable[[], datetime] = utcnow,
    should_stop: Callable[[], bool] = never,
) -> ReconcileOutcome:
    out = release_expired(db, clock())
    return match_remote(cfg, db, api, out, clock, should_stop)


def release_expired(db: Databases, now: datetime) -> ReconcileOutcome:
    """The database's part, no API call: expired claims go back to the queue, and sends whose process
    died become `unknown`. A submit does this before it claims, and `match_remote` after its first claim
    (while the claim runs, the SDK loads: `Api.warm`)."""
    out = ReconcileOutcome()
    with db.main.begin() as conn:
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


def match_remote(
    cfg: Config,
    db: Databases,
    api: Api,
    out: ReconcileOutcome,
    clock: Callable[[], datetime] = utcnow,
    should_stop: Callable[[], bool] = never,
) -> ReconcileOutcome:
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
    ctx = _Ctx(cfg, db, api, clock, should_stop)
    now = ctx.clock()
    with reading(ctx.db.main) as conn:
        unknown = intents.with_status(conn, BatchStatus.UNKNOWN)
        known = intents.known_batch_ids(conn)
    listing = _list_or_pause(ctx, out, unknown, known, now)
    if listing is None:
        return out
    failpoints.hit("reconcile.after_list")
    installation = databases.installation(ctx.db, ctx.clock())
    pending = {i.id: i for i in unknown}
    unexplained = _read_candidates(ctx, out, listing, pending, known, installation, now)
    # 3. Release only what is proven absent: list read far enough, nothing unexplained, grace over.
    for intent in pending.values():
        waiting_for = [
            c.id for c in listing.candidates[intent.id] if c.id in unexplained and c.id not in known
        ]
        _settle_unknown(ctx, out, intent, intent.id in listing.complete, waiting_for, now)

    _explain_strays(ctx, [r for r in listing.recent if r.id not in known], installation, now)
    out.unmatched_remote = [r.id for r in listing.recent if r.id not in known]
    if out.unmatched_remote:
        # Said once per batch id: batches other tools made on the same account stay in the listing for days.
        with ctx.db.main.begin() as conn:
            new = state.first_seen(conn, "remote_batch_unmatched", out.unmatched_remote, now)
        if new:
            log.warning("remote_batches_unmatched", batch_ids=new[:20], count=len(new))
    return out


def _list_or_pause(
    ctx: _Ctx, out: ReconcileOutcome, unknown: list[Intent], known: set[str], now: datetime
) -> Listing | None:
    """The API's list, read far enough; None when the read failed (a systemic answer pauses submission)."""
    since = now - ORPHAN_LOOKBACK  # remote batches this recent that match no record are reported
    try:
        return _read_list(ctx, unknown, known, since)
    except ProviderError as exc:
        if exc.kind == "systemic":
            with ctx.db.main.begin() as conn:
                state.pause(conn, str(exc), now)
            out.paused = str(exc)
        log.warning("reconcile_list_failed", error=str(exc), unknown=len(unknown))
        out.still_unknown = len(unknown)
        return None


def _read_candidates(
    ctx: _Ctx,
    out: ReconcileOutcome,
    listing: Listing,
    pending: dict[int, Intent],
    known: set[str],
    installation: str,
    now: datetime,
) -> dict[str, RemoteBatch]:
    """Steps 1 and 2 of `match_remote`: adopt what is proven ours (taken out of `pending`, added to
    `known`); returns the candidates that could still be an unknown intent's batch."""
    unexplained: dict[str, RemoteBatch] = {}
    # 1. Ended candidates are read: adopted only when their custom_ids are exactly an unknown intent's
    #    set (etl.prompt.custom_id names the installation and the intent). A failed read proves nothing.
    ordered = list({r.id: r for rs in listing.candidates.values() for r in rs}.values())
    for r in ordered:
        if not r.ended or r.id in known:
            continue
        verdict, owner = _proof(ctx, r, pending, installation)
        if verdict == "unreadable":
            unexplained[r.id] = r
        elif verdict == "ours" and owner in pending:
            if _adopt(ctx, out, pending[owner], r, now, how="its custom_ids are exactly the intent's"):
                known.add(r.id)
                del pending[owner]
            else:
                unexplained[r.id] = r
        else:
            log.warning("lookalike_batch_not_ours", batch_id=r.id, named_intent=owner, proof=verdict)

    # 2. A candidate that has not ended cannot be read: whoever it could belong to waits until it ends
    #    (the collector reconciles before it collects, so an adopted batch is collected in the same run).
    #    Adopting it early by size alone was undone only by its results, and if our own batch was still
    #    hidden from the list, re-queuing after that undo would have sent the rows twice.
    for r in ordered:
        if not r.ended and r.id not in known:
            unexplained[r.id] = r
    return unexplained


def _settle_unknown(
    ctx: _Ctx, out: ReconcileOutcome, intent: Intent, listed: bool, waiting_for: list[str], now: datetime
) -> None:
    """Step 3 of `match_remote` for one unknown intent not adopted: released once proven absent (`listed`:
    its part of the list read in full; `waiting_for`: candidates not explained yet), else left waiting."""
    grace = timedelta(seconds=ctx.config.submit.reconcile_grace_seconds)
    settle = timedelta(seconds=ctx.config.submit.dead_owner_settle_seconds)
    sent = intent.sent_at or intent.created_at
    if not listed:
        out.still_unknown += 1
        log.info("unknown_intent_waiting_for_list", intent=intent.id, anchor=intent.anchor_batch_id)
    elif waiting_for:
        out.still_unknown += 1
        log.info("unknown_intent_waiting_for_lookalike", intent=intent.id, batch_ids=waiting_for)
    elif now - sent > grace or liveness.settled_after_death(intent.owner, now, settle):
        # (a process known dead for `settle` has nothing in flight: see etl.liveness)
        reason = "batch create had an unknown outcome and no such batch appeared at the API; re-queued"
        with ctx.db.main.begin() as conn:
            if intents.release(conn, intent.id, (BatchStatus.UNKNOWN,), reason):
                per_task = q.tasks_of(conn, intent.id, DocStatus.CLAIMED)
                rows = q.unclaim(conn, intent.id, now, reason=reason)
                events.record_tasks(conn, now, "released", per_task, reason, intent.id)
                out.released_unknown += 1
                log.warning("unknown_intent_released", intent=intent.id, rows=rows)
        failpoints.hit("reconcile.after_release")
    else:
        out.still_unknown += 1
        log.info("unknown_intent_waiting", intent=intent.id, sent_at=str(sent), grace_s=grace.total_seconds())


@dataclass
class Listing:
    recent: list[RemoteBatch] = field(default_factory=list)  # listed batches created since the lookback
    candidates: dict[int, list[RemoteBatch]] = field(default_factory=dict)  # intent -> could be its batch
    complete: set[int] = field(default_factory=set)  # intents whose part of the list has been read in full


def _read_list(ctx: _Ctx, unknown: list[Intent], known: set[str], since: datetime) -> Listing:
    """Read the API's list far enough for every unknown intent (see `match_remote`).

    Decided on whole pages: an intent's part of the list is complete only at the end of a page, once its
    anchor has been seen and some batch listed so far is older than the anchor by `ANCHOR_SLACK`. The
    order inside a page is not relied on (two creates in one second, an API-side re-sort): every entry of
    a page is looked at before the page can end the reading. What is still assumed: the pages follow each
    other newest first (no batch created after the anchor is listed on a later page than one created more
    than `ANCHOR_SLACK` before it)."""
    out = Listing(candidates={i.id: [] for i in unknown})
    anchor_seen_at: dict[int, datetime] = {}  # intent -> the API's creation time of its anchor
    oldest: datetime | None = None
    listed = 0
    for page in ctx.api.provider.list_pages():
        for r in page:
            listed += 1
            oldest = r.created_at if oldest is None else min(oldest, r.created_at)
            if r.created_at >= since:
                out.recent.append(r)
            for i in unknown:
                if i.id in out.complete:
                    continue
                if r.id == i.anchor_batch_id:
                    anchor_seen_at[i.id] = r.created_at
                elif r.id not in known and r.total == i.request_count:
                    out.candidates[i.id].append(r)
        for i in unknown:
            seen = anchor_seen_at.get(i.id)
            if seen is not None and oldest is not None and oldest < seen - ANCHOR_SLACK:
                out.complete.add(i.id)
        if len(out.complete) == len(unknown) and oldest is not None and oldest < since:
            return out
        if listed >= MAX_LISTED:
            log.warning("reconcile_list_capped", listed=listed)
            return out
    out.complete = {i.id for i in unknown}  # the whole list was read
    return out


def release_not_before(intent: Intent, grace_seconds: float) -> datetime:
    """The earliest time (our clock) an unknown intent can be released; later if a batch could be its."""
    return (intent.sent_at or intent.created_at) + timedelta(seconds=grace_seconds)


def release_by_operator(db: Databases, now: datetime, intent_id: int) -> int:
    """`etl reconcile --release`: an unknown intent's rows back to the queue on the operator's word.

    If the API does hold a batch of these requests, they are billed twice. Returns the rows re-queued."""
    reason = "released by the operator (etl reconcile --release) while its create's outcome was unknown"
    with db.main.begin() as conn:
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


def acknowledge(db: Databases, batch_id: str) -> None:
    """`etl reconcile --acknowledge`: an unexplained batch of ours no longer fails `etl status --check`."""
    with db.main.begin() as conn:
        if not state.forget(conn, f"{UNEXPLAINED_KIND}:{batch_id}"):
            raise EtlError(f"{batch_id} is not an unexplained batch (etl status lists them)")
    log.warning("unexplained_batch_acknowledged", batch_id=batch_id)


def _adopt(ctx: _Ctx, out: ReconcileOutcome, intent: Intent, r: RemoteBatch, now: datetime, how: str) -> bool:
    with ctx.db.main.begin() as conn:
        if not intents.record_submitted(conn, intent.id, r, now, adopted=True):
            return False
        per_task = q.tasks_of(conn, intent.id, DocStatus.CLAIMED)
        rows = q.mark_submitted(conn, intent.id, now)
        events.record_tasks(conn, now, "submitted", per_task, "adopted after an ambiguous create", intent.id)
    out.adopted += 1
    log.info("unknown_intent_adopted", intent=intent.id, batch_id=r.id, rows=rows, how=how)
    failpoints.hit("reconcile.after_adopt")
    return True


def _proof(
    ctx: _Ctx, r: RemoteBatch, pending: dict[int, Intent], installation: str
) -> tuple[str, int | None]:
    """Whose an ended batch is, from its results' custom_ids.

    ("ours", intent): every custom_id is one of that unknown intent's, each once, and none is missing.
    ("foreign", None): another installation's or another sender's ids (the first line says so).
    ("mismatch", intent) / ("stray", intent): ids of ours naming an intent, but not exactly that unknown
    intent's set / an intent that is not unknown (etl.reconciler._explain_strays looks at those).
    ("unreadable", None): the read failed, broke or gave no line: that proves nothing either way."""
    ids = ctx.api.provider.result_custom_ids(r.id, ctx.config.collect.stream_timeout_seconds)
    try:
        first = next(ids, None)
        if first is None:
            log.warning("lookalike_results_unreadable", batch_id=r.id, error="no readable first line")
            return "unreadable", None
        kind, owner = _named_intent(ctx, parse_custom_id(first), installation)
        target = pending.get(owner) if owner is not None else None
        if kind == "foreign" or (kind == "legacy" and (target is None or target.installation is not None)):
            return "foreign", None
        if target is None:
            return "stray", owner
        with reading(ctx.db.main) as conn:
            expected = {target.custom_id(qid) for qid in q.ids_of(conn, target.id)}
        got = {first}
        lines = 1
        for cid in ids:
            lines += 1
            if cid is None or cid not in expected:
                return "mismatch", target.id
            got.add(cid)
        return ("ours" if got == expected and lines == len(expected) else "mismatch"), target.id
    except ProviderError as exc:
        log.warning("lookalike_results_unreadable", batch_id=r.id, error=str(exc))
        return "unreadable", None
    finally:
        ids.close()


def _named_intent(ctx: _Ctx, sent: SentId | None, installation: str) -> tuple[str, int | None]:
    """The intent a custom_id names: ("ours", intent) for this installation's ids; ("legacy", intent)
    for a `q<row>` id (the row's intent now, which only a legacy intent may claim); else ("foreign", None)."""
    if sent is None or (sent.installation is not None and sent.installation != installation):
        return "foreign", None
    if sent.installation is None:
        with reading(ctx.db.main) as conn:
            return "legacy", q.batch_ref_of(conn, sent.queue_id)
    return "ours", sent.intent


def _explain_strays(ctx: _Ctx, unmatched: list[RemoteBatch], installation: str, now: datetime) -> None:
    """Batches of ours that no intent explains (billed, and nobody would collect them): an ended,
    unrecorded batch is read once; if its custom_ids carry this installation and name an intent that was
    released (or failed), that intent records it after all: its rows still waiting in the queue go back
    to it and are collected from it; the rows sent again meanwhile were billed twice (reported). One that
    no intent can take is kept in `etl_state` and fails `etl status --check` (etl.status)."""
    ended = [r for r in unmatched if r.ended]
    if not ended:
        return
    with reading(ctx.db.main) as conn:
        judged = state.remembered(conn, STRAY_KIND, [r.id for r in ended])
    for r in ended:
        if r.id in judged or ctx.should_stop():
            continue
        try:
            verdict = _stray_ids(ctx, r, installation)
        except ProviderError as exc:
            log.warning("remote_batch_unreadable", batch_id=r.id, error=str(exc))
            continue
        if verdict is None:
            continue  # no readable line: looked at again next time
        intent_id, qids = verdict
        if intent_id is None or _take_stray(ctx, r, intent_id, qids, now):
            with ctx.db.main.begin() as conn:
                state.first_seen(conn, STRAY_KIND, [r.id], now)


def _stray_ids(ctx: _Ctx, r: RemoteBatch, installation: str) -> tuple[int | None, list[int]] | None:
    """(the intent named, every row id) for a batch of this installation's ids; (None, []) for anyone
    else's; None when nothing could be read."""
    ids = ctx.api.provider.result_custom_ids(r.id, ctx.config.collect.stream_timeout_seconds)
    try:
        first = next(ids, None)
        if first is None:
            return None
        sent = parse_custom_id(first)
        if sent is None or sent.installation != installation:
            return None, []
        qids = [sent.queue_id]
        for cid in ids:
            more = parse_custom_id(cid)
            if more is not None and more.installation == installation and more.intent == sent.intent:
                qids.append(more.queue_id)
        return sent.intent, qids
    finally:
        ids.close()


def _take_stray(ctx: _Ctx, r: RemoteBatch, intent_id: int, qids: list[int], now: datetime) -> bool:
    """A batch of ours naming `intent_id`. True when it is settled (recorded by that intent, or kept as
    unexplained); False when its intent is still in flight or unknown (looked at again next time)."""
    with ctx.db.main.begin() as conn:
        intent = intents.get(conn, intent_id)
        if intent is not None and intent.status in (
            BatchStatus.CLAIMED,
            BatchStatus.SENDING,
            BatchStatus.UNKNOWN,
        ):
            return False
        if intent is not None and intents.revive(conn, intent_id, r, now, STRAY_REASON):
            waiting = q.reattach_waiting(conn, intent_id, qids, now)
            twice = len(qids) - waiting
            why = f"{STRAY_REASON}: {waiting} row(s) still waiting are collected from it, {twice} were sent again"
            events.record(conn, now, "unexplained", None, r.total, why, intent_id)
            log.error(
                "stray_batch_recorded", batch_id=r.id, intent=intent_id, waiting=waiting, billed_twice=twice
            )
            return True
        what = (
            "names no intent of this database"
            if intent is None
            else f"names intent {intent_id} ({intent.status})"
        )
        detail = f"batch {r.id} of this installation {what}: {r.total} request(s) billed, never collected"
        state.set_value(conn, f"{UNEXPLAINED_KIND}:{r.id}", detail, now)
        events.record(conn, now, "unexplained", None, r.total, detail, intent_id if intent else None)
    log.error("unexplained_batch", batch_id=r.id, detail=detail)
    return True


STRAY_KIND = "remote_batch_judged"
UNEXPLAINED_KIND = "unexplained_batch"  # etl_state keys of batches of ours no intent could take
STRAY_REASON = "a batch of ours found at the API after its intent had been released"
