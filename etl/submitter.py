"""The nightly job: claim queued rows, build batches within the API limits, send each create once.

Order of every batch, each step durable before the next (see README "What survives what"):
claim rows into an intent -> build and validate (rejects written) -> fence (`sending`) ->
create with max_retries=0 -> record the batch id -> rows `submitted`.
An ambiguous create leaves the intent `unknown` for the reconciler; it is never sent again.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Connection, delete

from etl import budget, failpoints, routing
from etl.api import Api
from etl.clock import isoformat, never, utcnow
from etl.config import Config, SubmitSettings, Task
from etl.errors import EtlError, ProviderError, SubmissionPaused, clean, describe
from etl.memory import gc_paused
from etl.prompt import BODY_OVERHEAD, BatchBody, Rejection, Row, build_params, custom_id, encode_request
from etl.remote import RemoteBatch
from etl.store import batches as intents
from etl.store import databases, events, spend, state
from etl.store import queue as q
from etl.store.databases import Databases
from etl.store.engine import reading
from etl.store.schema import BatchStatus, batches

if TYPE_CHECKING:
    from etl.provider import Provider

log = structlog.get_logger("etl.submit")


@dataclass
class SubmitOutcome:
    batches: int = 0
    documents: int = 0
    rejected: int = 0
    payload_bytes: int = 0
    unknown: int = 0
    stopped: str | None = None
    interrupted: bool = False  # stopped because a stop was asked (typed: the daemon records it as such)
    batch_ids: list[str] = field(default_factory=list)
    waiting: int = 0  # documents a nightly cap held back (queued, with the reason on the row)
    held_tasks: set[str] = field(default_factory=set)  # tasks not claimed again this run: at their cap
    budget_spent: bool = False  # the night's cap (of all tasks) is reached: nothing more this run
    idle_reason: str | None = None  # why nothing was sent, when nothing was
    paused: str | None = None  # a create's systemic answer paused submission (`etl submit` exits 75)
    misconfigured: str | None = None  # a create's 404: the base URL is wrong (`etl submit` exits 78)


# The API's part of reconciliation, handed in by the caller (etl.pipeline): the reason submission was
# paused (the API refused our key or billing while listing), else None.
MatchRemote = Callable[[], str | None]


def preflight(cfg: Config, db: Databases, now: datetime) -> SubmitOutcome | None:
    """What is checked before a single row is claimed: a run that stops on a missing key must not leave
    rows `claimed` for the lease. Raises when paused or without a key; an outcome when creates are held."""
    with db.main.begin() as conn:
        paused = state.pause_reason(conn)
    if paused:
        raise SubmissionPaused(paused_message(paused, already=True))
    held = _creates_held(db, now)
    if held is not None:
        return held
    cfg.require_api_key()
    return None


@dataclass(frozen=True)
class _Ctx:
    """What one submit uses, as its caller gave it (nothing here changes while it runs)."""

    config: Config
    db: Databases
    api: Api
    owner: str  # etl.liveness: who claims, fences and renews
    clock: Callable[[], datetime]
    should_stop: Callable[[], bool]


def run(
    cfg: Config,
    db: Databases,
    api: Api,
    owner: str,
    match_remote: MatchRemote,
    clock: Callable[[], datetime] = utcnow,
    should_stop: Callable[[], bool] = never,
) -> SubmitOutcome:
    """Claim, build and send batches, after `preflight` and the database's part of reconciliation.

    The first claim (an UPDATE of up to 100,000 rows: seconds of database work) runs while the SDK loads
    on a thread; `match_remote` (the API's part of reconciliation) waits for the SDK: it runs before the
    first create (whose fence follows it), so the first batch is read and encoded while the SDK loads.
    With nothing claimed there is nothing to build meanwhile, and it may give rows back to claim now.
    With nothing to send and nothing to reconcile the run never calls the API (nor loads the SDK)."""
    ctx = _Ctx(cfg, db, api, owner, clock, should_stop)
    _supersede(ctx)
    claim = _claim(ctx)
    reconcile: list[Callable[[], object]] = []
    if claim is not None:
        reconcile.append(lambda: _match_remote(match_remote))
    elif _has_unknown(ctx):
        _match_remote(match_remote)
    outcome = SubmitOutcome()
    _send_claims(ctx, outcome, claim, reconcile)
    while reconcile:  # no batch got as far as its create
        reconcile.pop()()
    if outcome.waiting:
        _mark_waiting(ctx, outcome)
    if outcome.documents == 0 and outcome.stopped is None:
        outcome.idle_reason = (
            f"the nightly budget is spent: {outcome.waiting} document(s) wait for a later night"
            if outcome.waiting
            else _why_idle(ctx)
        )
    log.info(
        "submit_finished",
        batches=outcome.batches,
        documents=outcome.documents,
        rejected=outcome.rejected,
        unknown=outcome.unknown,
        stopped=outcome.stopped,
        waiting_for_budget=outcome.waiting,
    )
    return outcome


def _send_claims(
    ctx: _Ctx, outcome: SubmitOutcome, claim: Claim | None, reconcile: list[Callable[[], object]]
) -> None:
    """One batch per claim, up to `submit.max_batches_per_run`, until a stop, the budget or the queue ends."""
    while outcome.batches < ctx.config.submit.max_batches_per_run:
        if ctx.should_stop():
            outcome.stopped = "stop requested"
            outcome.interrupted = True
            if claim is not None:  # claimed, never sent: back to the queue now rather than at lease expiry
                _give_back(ctx, claim.intent_id, (BatchStatus.CLAIMED,), "submit stopped before building")
            return
        if outcome.budget_spent:
            return
        claim = claim or _claim(ctx, outcome.held_tasks)
        if claim is None:
            return
        with gc_paused():  # a batch is 100,000 request dicts: no GC rescans while it is built
            if not _one_batch(ctx, outcome, claim, reconcile):
                return
        claim = None


def paused_message(reason: str, *, already: bool = False) -> str:
    """The one line a paused submission gives, whoever paused it and whatever was queued."""
    return (
        f"submission {'is' if already else 'was'} paused: {reason}. Fix the cause (the API key, billing, "
        "spend limit), then run: etl resume"
    )


def _creates_held(db: Databases, now: datetime) -> SubmitOutcome | None:
    """The API said `retry-after` on the last create: nothing is claimed or sent before that time (the
    daemon re-runs the slot then, if it is before `schedule.retry_until`; after it the slot is reported)."""
    with reading(db.main) as conn:
        until = state.creates_held_until(conn)
    if until is None or now >= until:
        return None
    out = SubmitOutcome(stopped=f"rate limited: the API asked for no batch create before {isoformat(until)}")
    log.warning("create_held", until=isoformat(until), reason="retry-after of the last create")
    return out


def may_call_api(db: Databases) -> bool:
    """Something is queued, or an intent may need the API (an unknown create, or a claim or send whose
    lease may have run out: the reconciler turns those into queued rows or unknown creates)."""
    with reading(db.main) as conn:
        return q.any_queued(conn) or intents.may_need_the_list(conn)


def _has_unknown(ctx: _Ctx) -> bool:
    """An unknown create waits for the API's list (the API's part of reconciliation). Without one, a run that
    claimed nothing skips the list: remote batches matching no record are reported by the next run that
    asks the API anything (a submit that sends, a collect with a batch open) or by `etl reconcile`."""
    with reading(ctx.db.main) as conn:
        return bool(intents.with_status(conn, BatchStatus.UNKNOWN))


def _match_remote(match_remote: MatchRemote) -> None:
    """The API's part of reconciliation. The API refused our key (or billing) while listing: no create
    could succeed, so none is sent; the caller gives its claim back, attempts untouched."""
    paused = match_remote()
    if paused is not None:
        raise SubmissionPaused(paused_message(paused))


def _why_idle(ctx: _Ctx) -> str:
    """Why a run sent nothing: nothing queued, or rows held by another run's claim (and until when)."""
    with reading(ctx.db.main) as conn:
        counts = q.counts(conn)
        held = [i for i in intents.with_status(conn, BatchStatus.CLAIMED, BatchStatus.SENDING)]
    if counts.get("claimed"):
        until = max((i.lease_expires_at for i in held if i.lease_expires_at is not None), default=None)
        return (
            f"{counts['claimed']} row(s) are claimed by another run"
            + (f" until {until:%Y-%m-%d %H:%M:%S} UTC, when they go back to the queue" if until else "")
            + "; `etl status` shows its intents"
        )
    if counts.get("queued", 0) == 0:
        return "nothing is queued"
    return f"{counts['queued']} row(s) queued but none could be sent (see the log)"


@dataclass(frozen=True)
class Claim:
    intent_id: int
    at: datetime  # when the lease began


def _claim(ctx: _Ctx, exclude_tasks: set[str] | None = None) -> Claim | None:
    """Take the next batch's rows under a new intent and lease; None when nothing is queued."""
    limits = ctx.config.submit
    lease = timedelta(seconds=limits.claim_lease_seconds)
    installation = databases.installation(ctx.db, ctx.clock())
    now = ctx.clock()
    with ctx.db.main.begin() as conn:
        intent_id = intents.create_intent(conn, ctx.owner, now + lease, now, installation)
        claimed = q.claim(
            conn,
            intent_id,
            limits.max_requests_per_batch,
            now,
            exclude_tasks=exclude_tasks,
            live_cutoff=routing.batch_cutoff(ctx.config, now),
        )
        if claimed == 0:
            conn.execute(delete(batches).where(batches.c.id == intent_id))
            return None
    log.info("rows_claimed", intent=intent_id, rows=claimed)
    failpoints.hit("submit.after_claim")
    return Claim(intent_id, now)


def _supersede(ctx: _Ctx) -> None:
    """Older queued versions of a document are never sent: only the newest row's result would be kept."""
    with ctx.db.main.begin() as conn:
        n = q.supersede(conn, ctx.clock())
    if n:
        log.warning("documents_superseded", rows=n, reason=q.SUPERSEDED_REASON)


def _give_back(ctx: _Ctx, intent_id: int, statuses: tuple[str, ...], reason: str) -> None:
    """An intent of ours that was never sent: released, its rows back in the queue with attempts untouched."""
    with ctx.db.main.begin() as conn:
        if intents.release(conn, intent_id, statuses, reason, batches.c.owner == ctx.owner):
            q.unclaim(conn, intent_id, ctx.clock())


@dataclass
class _Packing:
    """What building one claim's batch decided, row by row: the create body and every row left out."""

    costing: budget.Costing
    allowance: budget.Allowance
    caps: dict[str, Decimal]
    night: str
    held_tasks: set[str]  # the run's own set: tasks at their cap are not claimed again this run
    lease_until: datetime
    body: BatchBody = field(default_factory=BatchBody)  # the create body, written as each row is encoded
    rejects: list[tuple[int, str]] = field(default_factory=list)
    rejects_logged: list[tuple[int, str, str]] = field(default_factory=list)
    rejected_per_task: Counter[tuple[str, str]] = field(default_factory=Counter)
    overflow: list[int] = field(default_factory=list)  # rows that did not fit: back to the queue
    held: list[tuple[int, str]] = field(default_factory=list)  # rows a nightly cap holds back, with why
    per_task: Counter[str] = field(default_factory=Counter)
    message_tokens: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    upper_units: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))

    def reject(self, row: Row, reason: str, key: str) -> None:
        self.rejects.append((row.id, reason))
        self.rejects_logged.append((row.id, row.doc_key, reason))
        self.rejected_per_task[(row.task, key)] += 1


def _one_batch(
    ctx: _Ctx, outcome: SubmitOutcome, claim: Claim, before_send: list[Callable[[], object]]
) -> bool:
    """Build and send the batch of one claim. False when the run must stop. `before_send` runs (once)
    before the first fence: the reconciliation that needs the API."""
    intent_id = claim.intent_id
    packing = _pack_claim(ctx, outcome, claim)
    if packing is None or not _record_build(ctx, outcome, intent_id, packing):
        return False
    if not packing.body.count:
        return True
    requests = sum(packing.per_task.values())
    body = packing.body.finish()
    del packing.body
    failpoints.hit("submit.after_build")
    provider = _ready_to_send(ctx, intent_id, before_send)
    if not _fence(ctx, outcome, intent_id, packing.lease_until):
        return False
    remote = _create(ctx, outcome, provider, intent_id, body)
    if remote is None or not _record_sent(ctx, outcome, intent_id, remote, packing.per_task):
        return False
    failpoints.hit("submit.after_record")
    outcome.batches += 1
    outcome.documents += requests
    outcome.payload_bytes += len(body)
    outcome.batch_ids.append(remote.id)
    log.info("batch_submitted", intent=intent_id, batch_id=remote.id, requests=requests, bytes=len(body))
    return True


def _pack_claim(ctx: _Ctx, outcome: SubmitOutcome, claim: Claim) -> _Packing | None:
    """Read the claim's rows and pack them (`_pack`), renewing the lease as it goes; None: lease lost.

    The nightly budget: every document's upper-bound cost is counted as it is added, and one that would
    cross a cap stays queued. The sum is checked again under the budget lock before anything is sent."""
    limits = ctx.config.submit
    lease = timedelta(seconds=limits.claim_lease_seconds)
    installation = databases.installation(ctx.db, ctx.clock())
    caps = budget.caps(ctx.config)
    night = budget.night_of(claim.at, ctx.config.schedule.zone)
    spent: dict[str, Decimal] = {}
    with reading(ctx.db.main) as reader:
        # input tokens of the upper bound raised by what count_tokens last measured (etl estimate)
        costing = budget.Costing(ctx.config, budget.margin(state.get_value(reader, budget.CALIBRATION_KEY)))
        if caps:
            spent = spend.reserved(reader, night)
    allowance = budget.Allowance(costing, caps, spent)
    packing = _Packing(costing, allowance, caps, night, outcome.held_tasks, claim.at + lease)
    renew_at = claim.at + lease / 3
    with reading(ctx.db.main) as reader:
        for row in q.iter_claimed(reader, claim.intent_id):
            added = _pack(
                packing, row, ctx.config.tasks, limits, custom_id(row.id, installation, claim.intent_id)
            )
            if added and packing.body.count % 1000 == 0 and ctx.clock() >= renew_at:
                now = ctx.clock()
                with ctx.db.main.begin() as conn:
                    if not intents.renew_lease(conn, claim.intent_id, ctx.owner, now, now + lease):
                        log.warning(
                            "claim_lost", intent=claim.intent_id, reason="lease expired while building"
                        )
                        outcome.stopped = "lease lost"
                        return None
                renew_at = now + lease / 3
                packing.lease_until = now + lease
    return packing


def _pack(p: _Packing, row: Row, tasks: Mapping[str, Task], limits: SubmitSettings, cid: str) -> bool:
    """Pure: one row into the batch, or into the rejected, overflowing or budget-held rows. True: added."""
    try:
        params = build_params(row, tasks, limits.max_body_bytes)
        encoded = encode_request(cid, params)
        tokens = budget.tokens_of(budget.message_text(params))
    except Exception as exc:  # recovery loop: a row that cannot be encoded is rejected, not the batch
        reason = (
            exc.reason if isinstance(exc, Rejection) else f"cannot be encoded for the API: {describe(exc)}"
        )
        p.reject(row, clean(reason), events.reason_key(clean(reason)))
        return False
    if BODY_OVERHEAD + len(encoded) > limits.max_batch_bytes:
        # Alone it would not fit in a batch: sending it can never work, and leaving it queued would
        # make every night claim and put it back.
        reason = (
            f"request is {len(encoded):,} bytes with its prompt; a batch may hold "
            f"{limits.max_batch_bytes:,} (submit.max_batch_bytes)"
        )
        p.reject(row, reason, "request larger than a batch (submit.max_batch_bytes)")
        return False
    if not p.body.fits(encoded, limits.max_batch_bytes):
        p.overflow.append(row.id)
        return False
    units = p.costing.tasks[row.task].upper_bound(tokens)
    if not p.allowance.take(row.task, units):
        p.held.append((row.id, budget.waiting_reason(p.night, p.caps, row.task)))
        p.held_tasks.add(row.task)
        return False
    p.message_tokens[row.task] += tokens
    p.upper_units[row.task] += units
    p.body.add(encoded)
    p.per_task[row.task] += 1
    return True


def _record_build(ctx: _Ctx, outcome: SubmitOutcome, intent_id: int, p: _Packing) -> bool:
    """What the build decided, durable before anything is sent: rejects written, rows that did not fit or
    wait for the budget back in the queue, the payload and its spend reserved. False: lease lost."""
    now = ctx.clock()
    with ctx.db.main.begin() as conn:
        if p.rejects:
            q.reject(conn, intent_id, p.rejects, now)
            for (task, reason), n in p.rejected_per_task.items():
                events.record(conn, now, "rejected", task, n, reason)
        if p.overflow:
            q.unclaim(conn, intent_id, now, ids=p.overflow)
        for reason, ids in q.group_by_reason(p.held).items():
            q.unclaim(conn, intent_id, now, ids=ids, reason=reason)
        if not intents.set_payload(conn, intent_id, ctx.owner, p.body.count, p.body.size):
            outcome.stopped = "lease lost"
            return False
        if p.body.count:
            _reserve(conn, outcome, intent_id, p, now)
        else:
            intents.release(conn, intent_id, (BatchStatus.CLAIMED,), "no sendable rows")
    outcome.waiting += len(p.held)
    if p.held:
        if budget.ALL in p.caps:
            outcome.budget_spent = True
        log.info("budget_cap_reached", intent=intent_id, waiting=len(p.held), night=p.night)
    outcome.rejected += len(p.rejects)
    for row_id, doc_key, reason in p.rejects_logged:
        log.warning("document_rejected", queue_id=row_id, doc_key=doc_key, reason=reason)
    return True


def _reserve(conn: Connection, outcome: SubmitOutcome, intent_id: int, p: _Packing, now: datetime) -> None:
    """The batch's spend, reserved under the budget lock; if another submitter took the budget since this
    batch was built, nothing is sent (its rows wait, `p.body` is emptied)."""
    shares = _shares(p.costing, p.per_task, p.message_tokens, p.upper_units)
    spend.lock(conn)
    if p.caps and not budget.fits(p.caps, spend.reserved(conn, p.night), shares):
        intents.release(conn, intent_id, (BatchStatus.CLAIMED,), "nightly budget taken meanwhile")
        q.unclaim(conn, intent_id, now, reason=f"{budget.BUDGET_REASON}: taken by another submit")
        outcome.waiting += p.body.count
        p.body = BatchBody()
        outcome.budget_spent = True
    else:
        spend.reserve(conn, intent_id, p.night, shares, now)


def _ready_to_send(ctx: _Ctx, intent_id: int, before_send: list[Callable[[], object]]) -> Provider:
    """Run what must precede the first create (the API's part of reconciliation), then build the client
    before the fence: a client that cannot be made sends nothing. On failure the claim is given back."""
    try:
        while before_send:
            before_send.pop()()
        return ctx.api.provider
    except SubmissionPaused:
        _give_back(ctx, intent_id, (BatchStatus.CLAIMED,), "submission paused before sending")
        raise
    except EtlError:
        _give_back(ctx, intent_id, (BatchStatus.CLAIMED,), "not sent: the API client could not be built")
        raise


def _fence(ctx: _Ctx, outcome: SubmitOutcome, intent_id: int, lease_until: datetime) -> bool:
    """The intent `sending`, durable before the create; False (nothing sent) when the lease is lost."""
    with ctx.db.main.begin() as conn:
        if not intents.fence_sending(conn, intent_id, ctx.owner, ctx.clock()):
            log.warning("claim_lost", intent=intent_id, reason="another process took these rows over")
            outcome.stopped = "lease lost"
            return False
    failpoints.hit("submit.after_fence")
    if ctx.clock() >= lease_until:
        # Paused between the fence and the call for longer than the lease: others may already treat this
        # intent as abandoned. We know it was never sent, so give the rows back instead of sending late.
        _give_back(
            ctx,
            intent_id,
            (BatchStatus.SENDING, BatchStatus.UNKNOWN),
            "lease ran out before the create was sent",
        )
        log.warning("claim_lost", intent=intent_id, reason="lease ran out between fence and create; not sent")
        outcome.stopped = "lease lost"
        return False
    return True


def _create(
    ctx: _Ctx, outcome: SubmitOutcome, provider: Provider, intent_id: int, body: bytes
) -> RemoteBatch | None:
    """The create, sent once (max_retries=0); None when it failed (`_create_failed` settled the intent)."""
    timer = _arm_during_create()
    try:
        remote = provider.create_batch(body)
    except ProviderError as exc:
        _create_failed(ctx, intent_id, exc, outcome)
        return None
    finally:
        if timer is not None:
            timer.cancel()
    failpoints.hit("submit.after_create")
    return remote


def _record_sent(
    ctx: _Ctx, outcome: SubmitOutcome, intent_id: int, remote: RemoteBatch, per_task: Counter[str]
) -> bool:
    """The batch id recorded and the rows `submitted`. False when the intent was released meanwhile."""
    now = ctx.clock()
    with ctx.db.main.begin() as conn:
        recorded = intents.record_submitted(conn, intent_id, remote, now)
        if recorded:
            q.mark_submitted(conn, intent_id, now)
            for task, n in per_task.items():
                events.record(conn, now, "submitted", task, n, batch_ref=intent_id)
    if recorded:
        return True
    outcome.stopped = "lease lost"
    if _recorded_by_another(ctx, intent_id, remote.id):
        # A reconciler released this intent while we were paused, then found our batch and recorded it
        # (etl.reconciler._explain_strays): it is collected like any other; nothing to cancel.
        return False
    # A reconciler released this intent while we were paused: its rows may already be in another
    # batch. Cancel ours before it is processed (unprocessed requests are not billed).
    log.error("orphan_batch_canceled", intent=intent_id, batch_id=remote.id)
    try:
        ctx.api.provider.cancel(remote.id)
    except ProviderError as exc:
        log.error("orphan_cancel_failed", batch_id=remote.id, error=str(exc))
    return False


def _recorded_by_another(ctx: _Ctx, intent_id: int, batch_id: str) -> bool:
    with reading(ctx.db.main) as conn:
        intent = intents.get(conn, intent_id)
    return intent is not None and intent.batch_id == batch_id


def _mark_waiting(ctx: _Ctx, outcome: SubmitOutcome) -> None:
    """Say on every queued row a cap holds back why it waits, not only on the rows this run looked at.

    One UPDATE per capped task (or one for all when the night's cap is reached); rows already carrying
    the reason are left alone, so only the first capped run of a night writes them.
    """
    caps = budget.caps(ctx.config)
    night = budget.night_of(ctx.clock(), ctx.config.schedule.zone)
    now = ctx.clock()
    with ctx.db.main.begin() as conn:
        if outcome.budget_spent and budget.ALL in caps:
            reason = budget.waiting_reason(night, {budget.ALL: caps[budget.ALL]}, "")
            q.mark_waiting(conn, reason, None, now)
        else:
            for task in sorted(outcome.held_tasks):
                q.mark_waiting(conn, budget.waiting_reason(night, caps, task), task, now)


def _shares(
    costing: budget.Costing,
    documents: Counter[str],
    message_tokens: dict[str, int],
    upper_units: dict[str, int],
) -> list[spend.Reservation]:
    """The batch's reservation, per task: its estimate (one cache write) and its upper bound."""
    out = []
    for task, n in documents.items():
        cost = costing.tasks[task]
        out.append(
            spend.Reservation(
                task=task,
                model=cost.task.model,
                documents=n,
                input_tokens=cost.input_tokens(n, message_tokens[task]),
                max_output_tokens=n * cost.task.max_tokens,
                estimated_usd=costing.usd(cost.estimate(n, message_tokens[task], 1)),
                reserved_usd=costing.usd(upper_units[task]),
            )
        )
    return out


def _arm_during_create() -> threading.Timer | None:
    """`submit.during_create`: die while the create call is in flight (tests pair it with a slow API)."""
    if not failpoints.armed("submit.during_create"):
        return None
    timer = threading.Timer(0.3, failpoints.hit, args=("submit.during_create",))
    timer.daemon = True
    timer.start()
    return timer


def _create_failed(ctx: _Ctx, intent_id: int, exc: ProviderError, outcome: SubmitOutcome) -> None:
    now = ctx.clock()
    reason = str(exc)
    with ctx.db.main.begin() as conn:
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
            outcome.paused = reason
            log.error("submission_paused", intent=intent_id, reason=reason)
        elif exc.kind == "misconfigured":  # a 404 on create: nothing happened, the URL is wrong
            q.unclaim(conn, intent_id, now, reason=f"not sent: {reason}")
            outcome.stopped = f"configuration: {reason}"
            outcome.misconfigured = reason
            log.error("create_misconfigured", intent=intent_id, error=reason)
        elif exc.kind == "unreachable":  # no connection was made: the API never saw it, re-queued now
            q.unclaim(conn, intent_id, now, reason=f"not sent: {reason}")
            outcome.stopped = f"API unreachable: {reason}"
            log.warning("create_not_sent", intent=intent_id, error=reason)
        elif exc.kind in ("rate_limited", "transient", "not_found"):
            q.unclaim(conn, intent_id, now, reason=f"not sent yet: {reason}")
            if exc.retry_after:  # respected by every later submit, bounded by the night's cut-off
                state.hold_creates(conn, now + timedelta(seconds=exc.retry_after), now)
            outcome.stopped = f"rate limited: {reason}"
            log.warning("create_rate_limited", intent=intent_id, error=reason, retry_after=exc.retry_after)
        else:
            moved = q.fail_claimed(
                conn, intent_id, f"the API refused the batch: {reason}", now, ctx.config.submit.max_attempts
            )
            outcome.stopped = f"create refused: {reason}"
            log.error("create_refused", intent=intent_id, error=reason, rows=moved)
