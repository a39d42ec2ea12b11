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
"""

from __future__ import annotations

import json
import queue
import signal
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog

from etl import counters, failpoints, routing, schema
from etl.budget import message_text, tokens_of
from etl.clock import parse_iso
from etl.config import Task
from etl.costs import usd_text
from etl.errors import EtlError, ProviderError, clean, describe, environmental
from etl.pricing import Meter, Usage
from etl.prompt import Rejection, build_params, custom_id
from etl.runtime import Runtime
from etl.settlement import Unreadable, checked_answer
from etl.store import events, state, warehouse
from etl.store import live as store
from etl.store.engine import reading

log = structlog.get_logger("etl.live")

WINDOW = timedelta(seconds=60)
PACING_SLICE = 0.25  # waits re-read the clock this often (tests move the clock instead of sleeping)
LISTEN_TIMEOUT = 0.5  # the listener checks for a stop this often
SATURATED_RETRIES = 20  # 429/529 answers for one document before it goes back to the queue
OVERLOADED = 529


class Pacer:
    """Never more than `rpm` calls in any 60 s, and none before a time the API asked us to wait for.

    Shared by the worker's threads. Time comes from `clock`; waiting is done in slices of
    `PACING_SLICE` real seconds on `stop`, so a stop ends a wait at once.
    """

    def __init__(self, rpm: int, clock: Callable[[], datetime], stop: threading.Event) -> None:
        self.rpm = rpm
        self.clock = clock
        self.stop = stop
        self.sent: list[datetime] = []
        self.not_before: datetime | None = None
        self._lock = threading.Lock()

    def _ready_at(self, now: datetime) -> datetime:
        self.sent = [t for t in self.sent if t > now - WINDOW]
        ready = now
        if len(self.sent) >= self.rpm:
            ready = self.sent[len(self.sent) - self.rpm] + WINDOW
        if self.not_before is not None and self.not_before > ready:
            ready = self.not_before
        return ready

    def acquire(self) -> bool:
        """Wait for a turn; False when stopped first."""
        while True:
            with self._lock:
                now = self.clock()
                ready = self._ready_at(now)
                if ready <= now:
                    self.sent.append(now)
                    return True
            if self.stop.wait(min((ready - now).total_seconds(), PACING_SLICE)):
                return False

    def hold_until(self, when: datetime) -> None:
        with self._lock:
            if self.not_before is None or when > self.not_before:
                self.not_before = when
                log.info("live_paced", until=when.isoformat())

    def observe(self, headers: Mapping[str, str], now: datetime) -> None:
        """Honour the API's word: `retry-after`, and a `*-remaining: 0` until its `*-reset`."""
        retry_after = headers.get("retry-after")
        if retry_after:
            with suppress(ValueError):
                self.hold_until(now + timedelta(seconds=float(retry_after)))
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            if headers.get(f"anthropic-ratelimit-{kind}-remaining") == "0":
                reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
                with suppress(ValueError):
                    self.hold_until(parse_iso(reset) if reset else now + timedelta(seconds=1))


@dataclass(frozen=True)
class _Answer:
    result: dict[str, Any]  # the etl_results row
    task: str
    usage: Usage
    standard: Decimal
    batch_cost: Decimal


class _Settler:
    """Writes answers on one thread, as many as have arrived in one transaction: results, rows `done`,
    events. A commit per answer (an fsync each on SQLite, one round trip more each on PostgreSQL) was
    the worker's bottleneck at 16 calls in flight (bench/RESULTS.md). An answer not yet committed when
    the process dies is an in-flight call like any other: called again, counted as possibly billed twice.
    """

    def __init__(self, worker: LiveWorker) -> None:
        self.worker = worker
        self._queue: queue.SimpleQueue[_Answer | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="etl-live-settle", daemon=True)
        self._thread.start()

    def put(self, answer: _Answer) -> None:
        self._queue.put(answer)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                group.append(item)
            self._settle(group)

    def _settle(self, group: list[_Answer]) -> None:
        """Write a group; if it fails, each answer alone, so one answer the database refuses ends its own
        row `dead` (with the database's reason) instead of leaving the group to be called and paid again.
        A failure of the machine (disk full...) leaves the rows `calling`: they are recovered later."""
        try:
            self._write(group)
            return
        except Exception as exc:  # recovery loop: the rows stay `calling` and are recovered
            if len(group) == 1:
                self._refused(group[0], exc)
                return
            if environmental(exc) is not None:
                log.error("live_settle_failed", documents=len(group), error=describe(exc))
                return
        for answer in group:
            try:
                self._write([answer])
            except Exception as exc:  # recovery loop: this answer's row only
                self._refused(answer, exc)

    def _refused(self, answer: _Answer, exc: Exception) -> None:
        if environmental(exc) is not None:
            log.error("live_settle_failed", documents=1, error=describe(exc))
            return
        reason = f"the database refused the answer: {describe(exc)}"
        try:
            self.worker._dead(answer.result["queue_id"], answer.task, reason)
        except Exception as again:  # recovery loop: the row stays `calling` and is recovered
            log.error("live_settle_failed", documents=1, error=describe(again))

    def _write(self, group: list[_Answer]) -> None:
        rt = self.worker.rt
        now = rt.clock()
        tally = events.Tally()
        results = [a.result for a in group]
        if not rt.same_database:
            with rt.warehouse.begin() as wconn:
                warehouse.upsert_few(wconn, results)
        with rt.engine.begin() as conn:
            if rt.same_database:
                warehouse.upsert_few(conn, results)
            settled = []
            for a in group:
                if store.done(conn, a.result["queue_id"], now):
                    settled.append(a)
                    tally.add(
                        "live_succeeded",
                        a.task,
                        input_tokens=a.usage.input_tokens,
                        output_tokens=a.usage.output_tokens,
                        cache_write_tokens=a.usage.cache_write,
                        cache_read_tokens=a.usage.cache_read,
                        cost_usd=a.standard,
                        standard_cost_usd=a.standard,
                    )
                else:
                    log.warning(
                        "live_claim_lost", queue_id=a.result["queue_id"], note="taken over; result stored"
                    )
            tally.flush(conn, now, None)
        with self.worker._lock:
            self.worker.unsettled_spend -= sum((a.standard for a in group), Decimal(0))
        self.worker.outcome.succeeded += len(settled)
        for a in settled:
            log.info(
                "live_document_done",
                queue_id=a.result["queue_id"],
                doc_key=a.result["doc_key"],
                cost_usd=round(a.standard, 6),
                batch_would_cost_usd=round(a.batch_cost, 6),
            )


@dataclass
class LiveOutcome:
    succeeded: int = 0
    dead: int = 0
    rejected: int = 0
    fell_back: int = 0
    given_back: int = 0
    recovered: int = 0
    possibly_billed_twice: int = 0
    calls: int = 0
    reasons: list[str] = field(default_factory=list)


class LiveWorker:
    def __init__(self, rt: Runtime, stop: threading.Event | None = None) -> None:
        self.rt = rt
        self.stop = stop or threading.Event()
        self.settings = rt.config.live
        self.pacer = Pacer(self.settings.requests_per_minute, rt.clock, self.stop)
        self.meter = Meter(rt.config.pricing)
        self.outcome = LiveOutcome()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[None]] = {}
        self._pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="etl-live")
        self.settler = _Settler(self)
        self.unsettled_spend = Decimal(0)  # answers handed to the settler, not yet committed
        self.inflight_spend = Decimal(0)  # upper bounds of the calls in flight (the daily cap counts them)
        self._last_renew = rt.clock()
        self._last_recover: datetime | None = None

    # -- the loop -----------------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> LiveOutcome:
        """Take urgent rows until stopped (or, with `once`, until none is left), then wait for the calls."""
        listener = None
        if not once and self.rt.engine.dialect.name == "postgresql":
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
                signals = store.listen(self.rt.engine, timeout=LISTEN_TIMEOUT)
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
        now = self.rt.clock()
        limit = routing.cutoff(self.rt.config, now)
        with reading(self.rt.engine) as conn:  # the idle poll: one index probe, no write lock
            if not store.any_waiting(conn, limit) or state.pause_reason(conn):
                return 0
        with self.rt.engine.begin() as conn:
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
        now = self.rt.clock()
        lease = timedelta(seconds=self.settings.claim_lease_seconds)
        if now - self._last_renew >= lease / 3:
            with self._lock:
                ids = list(self._inflight)
            if ids:
                with self.rt.engine.begin() as conn:
                    store.renew(conn, ids, now)
            self._last_renew = now
        if self._last_recover is None or now - self._last_recover >= lease / 2:
            self._last_recover = now
            self.recover(now)

    def recover(self, now: datetime) -> int:
        lease = timedelta(seconds=self.settings.claim_lease_seconds)
        with self.rt.engine.begin() as conn:
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
            with suppress(Exception), self.rt.engine.begin() as conn:
                store.give_back(
                    conn, [lrow.row.id], f"live path failed: {type(exc).__name__}: {exc}", self.rt.clock()
                )

    def _process(self, lrow: store.LiveRow) -> None:
        row = lrow.row
        cfg = self.rt.config
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
        bound, committed = self._reserve(task, params)
        if bound is None:
            return self._fall_back(row.id, row.task, self._cap_reason(committed, self._bound(task, params)))
        try:
            self._call(lrow, task, params)
        finally:
            with self._lock:
                self.inflight_spend -= bound

    def _reserve(self, task: Task, params: Mapping[str, Any]) -> tuple[Decimal | None, Decimal]:
        """Count this call's upper bound against the daily cap before it leaves, with the calls already in
        flight (4 calls checked at once against settled spend alone crossed the cap by a third): (the bound
        reserved, or None when it would cross the cap; what was spent or in flight). Exact Decimals."""
        cap = self.settings.daily_spend_cap_usd
        if cap <= 0:
            return Decimal(0), Decimal(0)
        bound = self._bound(task, params)
        now = self.rt.clock()
        with self._lock:  # the read under the lock: two threads never both take the last of the cap
            with reading(self.rt.engine) as conn:
                spent = store.spent_since(conn, now.replace(hour=0, minute=0, second=0, microsecond=0))
            committed = spent + self.unsettled_spend + self.inflight_spend
            if committed + bound > cap:
                return None, committed
            self.inflight_spend += bound
        return bound, committed

    def _bound(self, task: Task, params: Mapping[str, Any]) -> Decimal:
        """The most a call can cost at the standard price: its input at 4 characters a token (the system
        prompt at the cache-write price when it is cached) and `max_tokens` of output."""
        rates = self.meter.rates(task.model)
        if rates is None:
            return Decimal(0)
        system = tokens_of(task.system) if task.system else 0
        usage = Usage(
            input_tokens=tokens_of(message_text(params)) + (0 if task.cache_system else system),
            output_tokens=task.max_tokens,
            cache_write_1h=system if task.cache_system else 0,
        )
        return rates.usd(rates.units(usage))

    def _cap_reason(self, committed: Decimal, bound: Decimal) -> str:
        """Every amount with all its digits: a cap of $0.0005 is not printed as $0.00."""

        def exact(value: Decimal) -> str:
            return usd_text(value).rstrip("0").rstrip(".")

        return (
            f"daily live spend cap reached (${exact(committed)} spent or in flight, this call up to "
            f"${exact(bound)}, of ${self.settings.daily_spend_cap_usd:f}, live.daily_spend_cap_usd)"
        )

    def _call(self, lrow: store.LiveRow, task: Task, params: dict[str, Any]) -> None:
        row = lrow.row
        attempts = lrow.attempts
        saturated = 0
        retried_ambiguous = 0
        backoff = self.settings.backoff_seconds
        recorded = True  # the claim put the first call on record
        while True:
            if not self.pacer.acquire():
                self._give_back(row.id, "stopped before the live call", uncalled=recorded)
                return
            if not recorded:
                with self.rt.engine.begin() as conn:
                    if not store.record_call(conn, row.id, self.rt.clock()):
                        log.warning("live_claim_lost", queue_id=row.id)
                        return
            recorded = False
            failpoints.hit("live.before_call")
            self.outcome.calls += 1
            counters.LIVE_CALLS.inc()
            try:
                reply = self.rt.provider.create_message(params)
            except ProviderError as exc:
                now = self.rt.clock()
                self.pacer.observe(exc.headers, now)
                reason = str(exc)
                if exc.kind == "rate_limited" or exc.status == OVERLOADED:
                    # Refused before any work: nothing billed, no attempt counted.
                    counters.LIVE_REFUSED.labels(
                        code=str(OVERLOADED if exc.status == OVERLOADED else 429)
                    ).inc()
                    saturated += 1
                    if exc.retry_after is None:
                        self.pacer.hold_until(now + timedelta(seconds=backoff))
                        backoff = min(backoff * 2, self.settings.max_backoff_seconds)
                    with self.rt.engine.begin() as conn:
                        store.call_ended(conn, row.id, now, count_attempt=False)
                    if saturated >= SATURATED_RETRIES:
                        self._give_back(row.id, f"live API saturated, will try again: {reason}")
                        return
                    continue
                if exc.kind == "systemic":
                    with self.rt.engine.begin() as conn:
                        store.give_back(conn, [row.id], f"not sent: {reason}", now)
                        state.pause(conn, reason, now)
                    log.error("live_paused", queue_id=row.id, reason=reason)
                    self.outcome.given_back += 1
                    return
                if exc.kind in ("ambiguous", "transient") and attempts + 1 < self.settings.max_attempts:
                    attempts += 1
                    retried_ambiguous += 1
                    with self.rt.engine.begin() as conn:
                        store.call_ended(conn, row.id, now, count_attempt=True)
                        events.record(
                            conn, now, "live_billed_twice", row.task, 1, "retried after an ambiguous failure"
                        )
                    self.outcome.possibly_billed_twice += 1
                    self.pacer.hold_until(now + timedelta(seconds=exc.retry_after or backoff))
                    backoff = min(backoff * 2, self.settings.max_backoff_seconds)
                    log.warning("live_call_retried", queue_id=row.id, error=reason, attempt=attempts)
                    continue
                self._dead(
                    row.id,
                    row.task,
                    reason if exc.kind != "ambiguous" else f"{reason} (after {attempts + 1} attempts)",
                )
                return
            self.pacer.observe(reply.headers, self.rt.clock())
            failpoints.hit("live.after_call")
            self._succeeded(lrow, task, reply.message)
            return

    # -- outcomes -------------------------------------------------------------------------------------

    def _succeeded(self, lrow: store.LiveRow, task: Task, message: dict[str, Any]) -> None:
        row = lrow.row
        now = self.rt.clock()  # the answer's time; the settler commits it a moment later
        try:
            text, usage, model, stop_reason = checked_answer(message, self.rt.warehouse.dialect.name)
        except Unreadable as exc:  # billed, but no database would store it: the row ends here, not re-called
            self._dead(row.id, row.task, clean(str(exc)))
            return
        output_json = None
        if task.output_schema is not None:
            with suppress(ValueError, RecursionError):
                output_json = json.loads(text)
        batch_cost, standard = self.meter.costs(model, usage)
        result = {
            "doc_key": row.doc_key,
            "task": row.task,
            "queue_id": row.id,
            "custom_id": custom_id(row.id),
            "output_text": text,
            "output_json": output_json,
            "model": model,
            "stop_reason": stop_reason,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": usage.cache_write,
            "cache_read_input_tokens": usage.cache_read,
            "cost_usd": standard,  # the live path pays the standard price
            "standard_cost_usd": standard,
            "batch_id": str(message.get("id") or ""),  # the Message id: where the answer came from
            "enqueued_at": lrow.enqueued_at,
            "batch_ended_at": now,
            "collected_at": now,
            "mode": "live",
        }
        with self._lock:
            self.unsettled_spend += standard  # counted against the cap before the settler commits it
        self.settler.put(_Answer(result, row.task, usage, standard, batch_cost))

    def _fall_back(self, queue_id: int, task: str, reason: str) -> None:
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            if store.fall_back(conn, [queue_id], reason, now):
                events.record(conn, now, "live_fallback", task, 1, reason.split(" (")[0])
        self.outcome.fell_back += 1
        self.outcome.reasons.append(reason)
        log.warning("live_fell_back_to_batch", queue_id=queue_id, reason=reason)

    def _reject(self, queue_id: int, task: str, reason: str) -> None:
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            if store.reject(conn, queue_id, reason, now):
                events.record(conn, now, "rejected", task, 1, events.reason_key(reason))
        self.outcome.rejected += 1
        log.warning("document_rejected", queue_id=queue_id, reason=reason, path="live")

    def _dead(self, queue_id: int, task: str, reason: str) -> None:
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            if store.dead(conn, queue_id, reason, now):
                events.record(conn, now, "dead", task, 1, events.reason_key(reason))
        self.outcome.dead += 1
        log.error("live_document_dead", queue_id=queue_id, reason=reason)

    def _give_back(self, queue_id: int, reason: str, *, uncalled: bool = False) -> None:
        with self.rt.engine.begin() as conn:
            store.give_back(conn, [queue_id], reason, self.rt.clock(), uncalled=uncalled)
        self.outcome.given_back += 1


STALE_URGENT = timedelta(minutes=10)


def health(rt: Runtime, now: datetime) -> list[str]:
    """Problems of the live path for `etl status --check`: calls stuck past their lease, urgent rows that
    nobody takes (no `etl run` or `etl live` running?)."""
    lease = timedelta(seconds=rt.config.live.claim_lease_seconds)
    with reading(rt.engine) as conn:
        # Rows left `calling` by a crash are named even with the live path switched off since: then no
        # worker takes them back, and they would otherwise wait unseen.
        stuck = store.stuck_calls(conn, now, lease)
        oldest = (
            store.oldest_waiting(conn, routing.cutoff(rt.config, now)) if rt.config.live.enabled else None
        )
    problems = []
    if stuck:
        problems.append(
            f"{stuck} live call(s) not renewed for over {lease.total_seconds():.0f} s: their process died; "
            + (
                "a running `etl run` or `etl live` calls them again"
                if rt.config.live.enabled
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


def run(rt: Runtime, *, once: bool, stop: threading.Event | None = None) -> LiveOutcome:
    """The worker in the calling thread until `stop` (or, with `once`, until no urgent row is left)."""
    if not rt.config.live.enabled:
        raise EtlError("the live path is off (live.enabled = false): the nightly batch takes every row")
    rt.warm_provider()
    return LiveWorker(rt, stop).run(once=once)


def run_command(rt: Runtime, *, once: bool) -> LiveOutcome:
    """`etl live [--once]`: SIGTERM/SIGINT stop it after the calls in flight."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(rt, once=once, stop=stop)
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


def start_background(rt: Runtime, stop: threading.Event) -> Background | None:
    """Start the live worker beside the daemon's scheduler (None when `live.enabled` is false)."""
    if not rt.config.live.enabled:
        return None
    rt.warm_provider()  # the first urgent row must not wait for the SDK's import
    holder = Background(LiveWorker(rt, stop), threading.Thread())

    def body() -> None:
        while not stop.is_set():
            try:
                holder.worker.run()
            except Exception as exc:  # recovery loop: a database blip must not end the live path
                log.exception("live_worker_failed", error=str(exc))
                stop.wait(rt.config.live.poll_seconds)
                holder.worker = LiveWorker(rt, stop)

    holder.thread = threading.Thread(target=body, name="etl-live", daemon=True)
    holder.thread.start()
    return holder
