"""The live path: urgent queue rows through the Messages API, at the standard price, within seconds.

Which rows are urgent is decided in one place, etl/routing.py. This worker runs inside `etl run` (a
thread beside the scheduler, on every daemon: the claims are row-level) and as `etl live [--once]`.

Each urgent row: claimed (`calling`, committed) -> checked (the task may forbid the live path; the daily
spend cap) -> built and validated exactly as the batch builds it (`rejected` before any call) -> paced
(requests per minute, `retry-after`, `anthropic-ratelimit-*`) -> the call recorded (`call_started_at`,
committed) -> one POST /v1/messages -> the result in `etl_results` (`mode = 'live'`) and the row `done`.

The Messages API takes no idempotency key. A process that dies with a call in flight leaves the row
`calling` with `call_started_at` set; after `live.claim_lease_seconds` without renewal any worker puts it
back and calls once more, and the report counts it as "possibly billed twice" (docs/survival.md). An
ambiguous failure (timeout, reset, 5xx other than 529) is retried the same way, and counted the same way.

Its parts: the pace (etl/pacer.py), the daily spend cap (etl/spend.py), the writer of the answers
(etl/settler.py, with the warehouse row from etl/answer.py, as the batch path builds it), and the worker
here, which claims, calls and records.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from etl import counters, failpoints, routing
from etl.answer import RESULT_COLUMNS, Unreadable, checked_answer, parsed_json, result_row
from etl.api import Api
from etl.clock import utcnow
from etl.config import Config, Task
from etl.errors import EtlError, ProviderError, clean
from etl.pacer import Pacer
from etl.pricing import Meter
from etl.prompt import Rejection, Row, build_params
from etl.settings import Settings
from etl.settler import Answer, LiveOutcome, Settler
from etl.spend import Spend
from etl.store import events, schema, state
from etl.store import live as store
from etl.store.databases import Databases
from etl.store.dialect import capabilities
from etl.store.engine import reading

log = structlog.get_logger("etl.live")

LISTEN_TIMEOUT = 0.5  # the listener checks for a stop this often
SATURATED_RETRIES = 20  # 429/529 answers for one document before it goes back to the queue
OVERLOADED = 529


@dataclass
class _Tries:
    """One row's calls so far: attempts counted, 429/529 refusals, the next backoff."""

    attempts: int
    backoff: float
    saturated: int = 0
    recorded: bool = True  # the claim put the first call on record


class LiveWorker:
    def __init__(
        self,
        conf: Settings,
        db: Databases,
        api: Api,
        clock: Callable[[], datetime] = utcnow,
        stop: threading.Event | None = None,
    ) -> None:
        # `conf`: the configuration, read as the worker runs (the daemon's reload swaps it); what is
        # taken here at the start (concurrency, pacing, pricing, the cap) stays for the worker's life.
        self.conf, self.db, self.api, self.clock = conf, db, api, clock
        self.stop = stop or threading.Event()
        self.settings = conf.current.live
        self.pacer = Pacer(self.settings.requests_per_minute, clock, self.stop)
        self.meter = Meter(conf.current.pricing)
        self.spend = Spend(self.settings.daily_spend_cap_usd, self.meter, db.main, clock)
        self.outcome = LiveOutcome()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[None]] = {}
        self._pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="etl-live")
        self.settler = Settler(db, clock, self.spend, self.outcome, self._dead)
        self._last_renew = clock()
        self._last_recover: datetime | None = None

    # -- the loop -----------------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> LiveOutcome:
        """Take urgent rows until stopped (or, with `once`, until none is left), then wait for the calls."""
        listener = None
        if not once and capabilities(self.db.main).listen_notify:
            listener = threading.Thread(target=self._listen, name="etl-live-listen", daemon=True)
            listener.start()
        log.info("live_worker_started", concurrency=self.settings.concurrency, once=once)
        try:
            while not self.stop.is_set():
                self._housekeeping()
                took = self._fill()
                if once and not took and not self._inflight:
                    break
                self._pause(took)
        finally:
            self._drain()
            if listener is not None:
                self.stop.set()
                listener.join(LISTEN_TIMEOUT * 3)  # its connection goes back before the engine is closed
        log.info("live_worker_stopped", **{k: v for k, v in self.outcome.__dict__.items() if k != "reasons"})
        return self.outcome

    def _pause(self, took: int) -> None:
        """Wait for a slot to free, a NOTIFY, or the poll interval."""
        with self._lock:
            futures = list(self._inflight.values())
        if took and len(futures) < self.settings.concurrency:
            return  # there may be more rows right away
        # A finished call sets `wake` too (see `_fill`), so one wait serves slots, NOTIFYs and the poll.
        timeout = self.settings.poll_seconds
        if futures:
            timeout = min(timeout, self.settings.claim_lease_seconds / 3)
        self.wake.wait(timeout)

    def _listen(self) -> None:
        """PostgreSQL: each NOTIFY from the queue's trigger wakes the loop at once."""
        while not self.stop.is_set():
            try:
                signals = store.listen(self.db.main, timeout=LISTEN_TIMEOUT)
                for got in signals:
                    if got:
                        self.wake.set()
                    if self.stop.is_set():
                        signals.close()
                        return
            except Exception as exc:  # recovery loop: polling still finds the rows meanwhile
                log.warning("live_listen_failed", error=str(exc))
                self.stop.wait(self.settings.poll_seconds)

    def _free_slots(self) -> int:
        with self._lock:
            for qid in [q for q, f in self._inflight.items() if f.done()]:
                del self._inflight[qid]
            return self.settings.concurrency - len(self._inflight)

    def _fill(self) -> int:
        self.wake.clear()  # before looking: a NOTIFY from now on wakes the next pause at once
        free = self._free_slots()
        if free <= 0:
            return 0
        now = self.clock()
        limit = routing.cutoff(self.conf.current, now)
        with reading(self.db.main) as conn:  # the idle poll: one index probe, no write lock
            if not store.any_waiting(conn, limit) or state.pause_reason(conn):
                return 0
        with self.db.main.begin() as conn:
            rows = store.claim(conn, limit, free, now)
        for lrow in rows:
            log.info("live_claimed", queue_id=lrow.row.id, doc_key=lrow.row.doc_key, due_by=str(lrow.due_by))
            with self._lock:
                future = self._pool.submit(self._guarded, lrow)
                self._inflight[lrow.row.id] = future
            future.add_done_callback(lambda _: self.wake.set())
        return len(rows)

    def _housekeeping(self) -> None:
        """Renew the lease of our `calling` rows; put back rows whose worker died."""
        now = self.clock()
        lease = timedelta(seconds=self.settings.claim_lease_seconds)
        if now - self._last_renew >= lease / 3:
            with self._lock:
                ids = list(self._inflight)
            if ids:
                with self.db.main.begin() as conn:
                    store.renew(conn, ids, now)
            self._last_renew = now
        if self._last_recover is None or now - self._last_recover >= lease / 2:
            self._last_recover = now
            self.recover(now)

    def recover(self, now: datetime) -> int:
        lease = timedelta(seconds=self.settings.claim_lease_seconds)
        with self.db.main.begin() as conn:
            back = store.recover(conn, now, lease)
            twice = [r for r in back if r.in_flight]
            for r in twice:
                events.record(conn, now, "live_billed_twice", r.task, 1, "live call interrupted by a crash")
        for r in back:
            log.warning("live_row_recovered", queue_id=r.id, possibly_billed_twice=r.in_flight)
        self.outcome.recovered += len(back)
        self.outcome.possibly_billed_twice += len(twice)
        return len(back)

    def _drain(self) -> None:
        with self._lock:
            futures = list(self._inflight.values())
        wait(futures)
        self._pool.shutdown(wait=True)
        self.settler.close()

    # -- one document ---------------------------------------------------------------------------------

    def _guarded(self, lrow: store.LiveRow) -> None:
        try:
            self._process(lrow)
        except Exception as exc:  # recovery loop: the row goes back to the queue, the worker goes on
            log.exception("live_document_failed", queue_id=lrow.row.id, error=str(exc))
            with suppress(Exception), self.db.main.begin() as conn:
                store.give_back(
                    conn, [lrow.row.id], f"live path failed: {type(exc).__name__}: {exc}", self.clock()
                )

    def _process(self, lrow: store.LiveRow) -> None:
        row = lrow.row
        cfg = self.conf.current
        task = cfg.tasks.get(row.task)
        if task is not None and not task.live:
            self._fall_back(
                row.id, row.task, f"task {row.task!r} forbids the live path (tasks.{row.task}.live = false)"
            )
            return
        try:
            params = build_params(row, cfg.tasks, cfg.submit.max_body_bytes)
        except Rejection as rej:
            self._reject(row.id, row.task, rej.reason)
            return
        assert task is not None  # build_params rejects unknown tasks
        bound, committed = self.spend.reserve(task, params)
        if bound is None:
            reason = self.spend.cap_reason(committed, self.spend.bound(task, params))
            return self._fall_back(row.id, row.task, reason)
        try:
            self._call(lrow, task, params)
        finally:
            self.spend.release(bound)

    def _call(self, lrow: store.LiveRow, task: Task, params: dict[str, Any]) -> None:
        row = lrow.row
        tries = _Tries(attempts=lrow.attempts, backoff=self.settings.backoff_seconds)
        while True:
            if not self.pacer.acquire():
                self._give_back(row.id, "stopped before the live call", uncalled=tries.recorded)
                return
            if not tries.recorded:
                with self.db.main.begin() as conn:
                    if not store.record_call(conn, row.id, self.clock()):
                        log.warning("live_claim_lost", queue_id=row.id)
                        return
            tries.recorded = False
            failpoints.hit("live.before_call")
            self.outcome.calls += 1
            counters.LIVE_CALLS.inc()
            try:
                reply = self.api.provider.create_message(params)
            except ProviderError as exc:
                if self._call_failed(row, exc, tries):
                    continue
                return
            self.pacer.observe(reply.headers, self.clock())
            failpoints.hit("live.after_call")
            self._succeeded(lrow, task, reply.message)
            return

    def _call_failed(self, row: Row, exc: ProviderError, tries: _Tries) -> bool:
        """A refused or failed call: True to call again, False when the row's outcome is settled."""
        now = self.clock()
        self.pacer.observe(exc.headers, now)
        reason = str(exc)
        if exc.kind == "rate_limited" or exc.status == OVERLOADED:
            return self._saturated(row, exc, tries, now)
        if exc.kind == "systemic":
            _pause_for(self.db, row.id, reason, now)
            self.outcome.given_back += 1
            return False
        if exc.kind in ("ambiguous", "transient") and tries.attempts + 1 < self.settings.max_attempts:
            tries.attempts += 1
            _record_retry(self.db, row, now)
            self.outcome.possibly_billed_twice += 1
            self.pacer.hold_until(now + timedelta(seconds=exc.retry_after or tries.backoff))
            tries.backoff = min(tries.backoff * 2, self.settings.max_backoff_seconds)
            log.warning("live_call_retried", queue_id=row.id, error=reason, attempt=tries.attempts)
            return True
        if exc.kind == "ambiguous":
            reason = f"{reason} (after {tries.attempts + 1} attempts)"
        self._dead(row.id, row.task, reason)
        return False

    def _saturated(self, row: Row, exc: ProviderError, tries: _Tries, now: datetime) -> bool:
        """429 or 529: refused before any work, so nothing billed and no attempt counted. True to call
        again; after `SATURATED_RETRIES` the row goes back to the queue."""
        counters.LIVE_REFUSED.labels(code=str(OVERLOADED if exc.status == OVERLOADED else 429)).inc()
        tries.saturated += 1
        if exc.retry_after is None:
            self.pacer.hold_until(now + timedelta(seconds=tries.backoff))
            tries.backoff = min(tries.backoff * 2, self.settings.max_backoff_seconds)
        with self.db.main.begin() as conn:
            store.call_ended(conn, row.id, now, count_attempt=False)
        if tries.saturated >= SATURATED_RETRIES:
            self._give_back(row.id, f"live API saturated, will try again: {exc}")
            return False
        return True

    # -- outcomes -------------------------------------------------------------------------------------

    def _succeeded(self, lrow: store.LiveRow, task: Task, message: dict[str, Any]) -> None:
        row = lrow.row
        now = self.clock()  # the answer's time; the settler commits it a moment later
        try:
            answer = checked_answer(message, capabilities(self.db.warehouse))
        except Unreadable as exc:  # billed, but no database would store it: the row ends here, not re-called
            self._dead(row.id, row.task, clean(str(exc)))
            return
        text, usage, model, _ = answer
        batch_cost, standard = self.meter.costs(model, usage)
        values = result_row(
            doc_key=row.doc_key,
            task=row.task,
            queue_id=row.id,
            answer=answer,
            output_json=parsed_json(text) if task.output_schema is not None else None,
            cost=standard,  # the live path pays the standard price
            standard=standard,
            source_id=str(message.get("id") or ""),  # the Message id: where the answer came from
            enqueued_at=lrow.enqueued_at,
            ended_at=now,
            collected_at=now,
            mode="live",
        )
        self.spend.answered(standard)  # counted against the cap before the settler commits it
        self.settler.put(
            Answer(dict(zip(RESULT_COLUMNS, values, strict=True)), row.task, usage, standard, batch_cost)
        )

    def _fall_back(self, queue_id: int, task: str, reason: str) -> None:
        now = self.clock()
        with self.db.main.begin() as conn:
            if store.fall_back(conn, [queue_id], reason, now):
                events.record(conn, now, "live_fallback", task, 1, reason.split(" (")[0])
        self.outcome.fell_back += 1
        self.outcome.reasons.append(reason)
        log.warning("live_fell_back_to_batch", queue_id=queue_id, reason=reason)

    def _reject(self, queue_id: int, task: str, reason: str) -> None:
        now = self.clock()
        with self.db.main.begin() as conn:
            if store.reject(conn, queue_id, reason, now):
                events.record(conn, now, "rejected", task, 1, events.reason_key(reason))
        self.outcome.rejected += 1
        log.warning("document_rejected", queue_id=queue_id, reason=reason, path="live")

    def _dead(self, queue_id: int, task: str, reason: str) -> None:
        now = self.clock()
        with self.db.main.begin() as conn:
            if store.dead(conn, queue_id, reason, now):
                events.record(conn, now, "dead", task, 1, events.reason_key(reason))
        self.outcome.dead += 1
        log.error("live_document_dead", queue_id=queue_id, reason=reason)

    def _give_back(self, queue_id: int, reason: str, *, uncalled: bool = False) -> None:
        with self.db.main.begin() as conn:
            store.give_back(conn, [queue_id], reason, self.clock(), uncalled=uncalled)
        self.outcome.given_back += 1


STALE_URGENT = timedelta(minutes=10)


def health(cfg: Config, db: Databases, now: datetime) -> list[str]:
    """Problems of the live path for `etl status --check`: calls stuck past their lease, urgent rows that
    nobody takes (no `etl run` or `etl live` running?)."""
    lease = timedelta(seconds=cfg.live.claim_lease_seconds)
    with reading(db.main) as conn:
        # Rows left `calling` by a crash are named even with the live path switched off since: then no
        # worker takes them back, and they would otherwise wait unseen.
        stuck = store.stuck_calls(conn, now, lease)
        oldest = store.oldest_waiting(conn, routing.cutoff(cfg, now)) if cfg.live.enabled else None
    problems = []
    if stuck:
        problems.append(
            f"{stuck} live call(s) not renewed for over {lease.total_seconds():.0f} s: their process died; "
            + (
                "a running `etl run` or `etl live` calls them again"
                if cfg.live.enabled
                else "live.enabled is false, so nothing takes them back: enable it for one `etl live --once`"
            )
        )
    waited = now - (schema.as_utc(oldest) or now)
    if waited > STALE_URGENT:
        problems.append(
            f"urgent rows have waited {waited.total_seconds() / 60:.0f} min for the live path: "
            "is `etl run` or `etl live` running?"
        )
    return problems


def run(
    cfg: Config,
    db: Databases,
    api: Api,
    clock: Callable[[], datetime] = utcnow,
    *,
    once: bool,
    stop: threading.Event | None = None,
) -> LiveOutcome:
    """The worker in the calling thread until `stop` (or, with `once`, until no urgent row is left)."""
    if not cfg.live.enabled:
        raise EtlError("the live path is off (live.enabled = false): the nightly batch takes every row")
    api.warm()
    return LiveWorker(Settings(cfg), db, api, clock, stop).run(once=once)


def run_command(
    cfg: Config, db: Databases, api: Api, clock: Callable[[], datetime], *, once: bool
) -> LiveOutcome:
    """`etl live [--once]`: SIGTERM/SIGINT stop it after the calls in flight."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(cfg, db, api, clock, once=once, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Background:
    """The worker as `etl run` runs it: a thread, stopped with the daemon."""

    worker: LiveWorker
    thread: threading.Thread

    def stop(self, timeout: float) -> None:
        self.worker.stop.set()
        self.thread.join(timeout)


def start_background(
    conf: Settings, db: Databases, api: Api, clock: Callable[[], datetime], stop: threading.Event
) -> Background | None:
    """Start the live worker beside the daemon's scheduler (None when `live.enabled` is false)."""
    if not conf.current.live.enabled:
        return None
    api.warm()  # the first urgent row must not wait for the SDK's import
    holder = Background(LiveWorker(conf, db, api, clock, stop), threading.Thread())

    def body() -> None:
        while not stop.is_set():
            try:
                holder.worker.run()
            except Exception as exc:  # recovery loop: a database blip must not end the live path
                log.exception("live_worker_failed", error=str(exc))
                stop.wait(conf.current.live.poll_seconds)
                holder.worker = LiveWorker(conf, db, api, clock, stop)

    holder.thread = threading.Thread(target=body, name="etl-live", daemon=True)
    holder.thread.start()
    return holder


def _pause_for(db: Databases, row_id: int, reason: str, now: datetime) -> None:
    """A systemic refusal (key, billing): the row back to the queue, submission paused for everyone."""
    with db.main.begin() as conn:
        store.give_back(conn, [row_id], f"not sent: {reason}", now)
        state.pause(conn, reason, now)
    log.error("live_paused", queue_id=row_id, reason=reason)


def _record_retry(db: Databases, row: Row, now: datetime) -> None:
    """A call that may have been billed is made again: its attempt counted, the possible double billing kept."""
    with db.main.begin() as conn:
        store.call_ended(conn, row.id, now, count_attempt=True)
        events.record(conn, now, "live_billed_twice", row.task, 1, "retried after an ambiguous failure")
