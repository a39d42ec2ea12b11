"""`etl run`: the long-running service.

One main thread, one job thread:

- the **main loop** sleeps on an event between ticks (no busy polling), renews the leader lease in
  `etl_state`, pings the systemd watchdog while jobs make progress, reports STATUS, applies SIGHUP;
- **APScheduler** (`BackgroundScheduler`, one worker thread, so jobs never overlap) fires the nightly
  submit and the morning collect + report on `etl.scheduling` slots, and an adaptive poll that collects
  ended batches in between.

Several daemons may share one database. Only the lease holder runs jobs, and each scheduled run first
claims its `(job, slot)` row in `etl_runs` (UNIQUE), so even two leaders by mistake run a slot once;
the queue and batch claims are row-level underneath that. A follower takes over within a lease period
when the leader dies, and catches up on the slot it missed.

SIGTERM/SIGINT make `rt.should_stop` true: the submitter and collector stop between batches, the
daemon releases the lease, says STOPPING=1 and exits 0. SIGHUP re-reads the configuration file: the
schedule, logging level and submit/collect/task settings apply at once; database and API settings
need a restart (the daemon says so in the log).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import event

from etl import config as config_mod
from etl import (
    life,
    live,
    logs,
    metrics,
    pipeline,
    reconciler,
    recovery,
    report,
    scheduling,
)
from etl.errors import ConfigError, SubmissionPaused, environmental
from etl.notify import Notifier
from etl.runtime import Runtime
from etl.schema import BatchStatus
from etl.store import batches as intents
from etl.store import grants, migrate, state
from etl.store.engine import denied

log = structlog.get_logger("etl.daemon")

JOBS = ("submit", "collect")
RUN_NOW_ENV = "ETL_DAEMON_RUN_NOW"  # hidden: "submit,collect" runs those jobs at once (tests, demos)
STOP_GRACE_ENV = "ETL_DAEMON_STOP_GRACE_SECONDS"  # how long a stop waits for the current step
STALL_ENV = "ETL_DAEMON_STALL_SECONDS"  # a job silent this long stops the watchdog pings
MAX_TICK_SECONDS = 60.0
DEFAULT_STOP_GRACE = 60.0  # well inside the unit's TimeoutStopSec=90
STALL_MARGIN = 60.0  # beyond the longest single call a job may wait on (see `default_stall`)
STARTUP_POLL_SECONDS = 1.0  # a poll killed half-way resumes this soon after a restart


def default_stall(cfg: config_mod.Config) -> float:
    """How long a job may go without progress (a database commit, or asking whether to stop) before the
    watchdog pings stop: the longest call it can legitimately wait on, plus a margin."""
    longest = max(
        cfg.submit.create_timeout_seconds, cfg.collect.stream_timeout_seconds, cfg.api_timeout_seconds
    )
    return longest + STALL_MARGIN


def _quiet_recovery_skips(record: logging.LogRecord) -> bool:
    """The recovery tick is skipped while a job holds the one worker thread: expected, not a warning."""
    msg = record.getMessage()
    return not (msg.startswith('Execution of job "recovery') and "skipped" in msg)


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        return float(env.get(name, "") or default)
    except ValueError:
        return default


class Daemon:
    def __init__(self, rt: Runtime, notifier: Notifier, env: Mapping[str, str] | None = None) -> None:
        self.rt = rt
        self.notifier = notifier
        self.env = os.environ if env is None else env
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.leader = False
        self.current: str | None = None  # the job running now, if any
        self.progress_at = time.monotonic()
        self.poll_delay: float | None = None
        self.stop_grace = _float_env(self.env, STOP_GRACE_ENV, DEFAULT_STOP_GRACE)
        self.stall_limit = _float_env(self.env, STALL_ENV, default_stall(rt.config))
        self.slot: datetime | None = None  # the slot of the job running now
        self._recovering = True  # etl.recovery has something pending: apply its rules every tick
        self._recovery_at = 0.0
        self.run_now = [j for j in self.env.get(RUN_NOW_ENV, "").replace(" ", "").split(",") if j in JOBS]
        self._signals = 0
        self._idle = threading.Event()
        self._idle.set()
        self._wake = threading.Event()  # set by any signal: ends the main loop's sleep early
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.live: live.Background | None = None
        self.metrics: metrics.Server | None = None
        rt.should_stop = self._should_stop

    # -- time ---------------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.rt.clock()

    @property
    def offset(self) -> timedelta:
        """How far the runtime's clock is from the wall clock (non-zero only in tests and the demo)."""
        return self.rt.clock() - datetime.now(UTC)

    def cron(self, job: str) -> str:
        sch = self.rt.config.schedule
        return sch.submit_cron if job == "submit" else sch.collect_cron

    # -- signals --------------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        self.progress_at = time.monotonic()  # the jobs ask between batches: that is their heartbeat
        return self.stop_event.is_set()

    def _on_commit(self, _conn: Any) -> None:
        # Every transaction a job commits (a claim, a chunk of results, a claim's lease renewal) is progress.
        # A job stuck on a socket or a lock commits nothing, and the watchdog pings stop (`_making_progress`).
        # The main loop's own commits (the leader lease) say nothing about the job: they do not count.
        if threading.current_thread() is not threading.main_thread():
            self.progress_at = time.monotonic()

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # A second signal: the operator insists. Everything is resumable from the database.
            os.write(2, b"etl: second stop signal, exiting now\n")
            os._exit(130)
        self.stop_event.set()
        self._wake.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_event.set()
        self._wake.set()

    def install_signals(self) -> None:
        # A signal may be delivered to any thread (the job thread, the scheduler's); Python runs the
        # handler in the main thread only when that thread wakes up. The wakeup fd makes it wake up.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    # -- the service ----------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.rt.config
        self.notifier.status("checking the database schema")
        migrate.check(self.rt.engine, self.rt.warehouse)
        grants.check(
            self.rt.engine, self.rt.warehouse
        )  # a missing right: one line now, not a job's traceback
        self.rt.config.require_api_key()
        self._hold_life_lock()
        event.listen(self.rt.engine, "commit", self._on_commit)
        self.metrics = metrics.serve(self.rt)  # the Prometheus page, on every instance (docs/deploy.md)
        self.notifier.status("reconciling unfinished batch creates")
        with logs.run_context("reconcile"):
            found = recovery.sweep(self.rt)  # a dead predecessor's runs and intents, known at once
            out = reconciler.run(self.rt)
            log.info(
                "startup_reconciled",
                adopted=out.adopted,
                still_unknown=out.still_unknown,
                crashed_runs=len(found.crashed_runs),
                dead_owner_intents=len(found.ended_leases),
            )
        logging.getLogger("apscheduler.scheduler").addFilter(_quiet_recovery_skips)
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._schedule_jobs()
        self.scheduler.add_job(
            self._recovery_tick,
            IntervalTrigger(seconds=recovery.TICK_SECONDS),
            id="recovery",
            name="recovery",
            replace_existing=True,
        )
        self.scheduler.start()
        self.live = live.start_background(self.rt, self.stop_event)  # urgent rows, on every instance
        log.info(
            "daemon_started",
            owner=self.rt.owner,
            timezone=cfg.schedule.timezone,
            submit_cron=cfg.schedule.submit_cron,
            collect_cron=cfg.schedule.collect_cron,
            poll_minutes=cfg.schedule.poll_minutes,
            watchdog_seconds=self.notifier.watchdog_interval,
            stall_seconds=self.stall_limit,
            next_runs=self._next_runs(),
        )
        self.notifier.ready(self._status_line())
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return 0

    def _next_runs(self) -> dict[str, str | None]:
        """When each scheduled job runs next (wall-clock time, UTC), for the start-up log line."""
        assert self.scheduler is not None
        return {
            job.id: None if job.next_run_time is None else job.next_run_time.astimezone(UTC).isoformat()
            for job in self.scheduler.get_jobs()
        }

    def _tick_seconds(self) -> float:
        tick = min(MAX_TICK_SECONDS, self.rt.config.schedule.leader_lease_seconds / 3)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            tick = min(tick, interval)
        return max(tick, 0.2)

    def _main_loop(self) -> None:
        while not self.stop_event.is_set():
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload()
            self._lease_tick()
            if self.scheduler is not None:
                # After a suspend the scheduler's monotonic wait oversleeps; nudging it each tick makes
                # a missed slot fire (once, coalesced) within a tick of waking up.
                self.scheduler.wakeup()
            if self._making_progress():
                self.notifier.watchdog()
            else:
                log.error("job_stalled", job=self.current, silent_seconds=round(self._silent_seconds()))
            self.notifier.status(self._status_line())
            # Asleep until the next tick or a signal; the scheduler's own thread fires the jobs.
            self._sleep(self._tick_seconds())

    def _sleep(self, seconds: float) -> None:
        if self._wake_r is None:
            self._wake.wait(seconds)
        else:
            select.select([self._wake_r], [], [], seconds)
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(512):
                    pass
        self._wake.clear()

    def _silent_seconds(self) -> float:
        return time.monotonic() - self.progress_at

    def _making_progress(self) -> bool:
        return self.current is None or self._silent_seconds() < self.stall_limit

    def _status_line(self) -> str:
        if self.stop_event.is_set():
            return "stopping"
        if self.current:
            return f"running {self.current}"
        if not self.leader:
            return "standby: another instance holds the leader lease"
        nxt = []
        if self.scheduler is not None:
            for job in (*JOBS, "poll"):
                sj = self.scheduler.get_job(job)
                if sj is not None and sj.next_run_time is not None:
                    at = (sj.next_run_time.astimezone(UTC) + self.offset).astimezone(
                        self.rt.config.schedule.zone
                    )
                    nxt.append(f"{job} {at:%Y-%m-%d %H:%M %Z}")
        return "idle; next: " + ", ".join(nxt) if nxt else "idle"

    # -- leadership -----------------------------------------------------------------------------------

    def _hold_life_lock(self) -> None:
        """Hold our proof of life for as long as we live (etl.life): PostgreSQL, a session advisory lock
        (re-taken on the next tick if the connection drops); SQLite, a flock beside the database."""
        life.hold(self.rt)

    def _lease_tick(self) -> None:
        ttl = timedelta(seconds=self.rt.config.schedule.leader_lease_seconds)
        try:
            self._hold_life_lock()
            with self.rt.engine.begin() as conn:
                got = state.acquire_lease(conn, state.LEADER_KEY, self.rt.owner, self.now(), ttl)
            if not got:  # held: by a process that is gone? Then at once, not at lease expiry.
                got = recovery.take_over_leader(self.rt, self.now(), ttl)
        except Exception as exc:  # recovery loop: a database blip must not kill the service
            log.warning("lease_renewal_failed", error=str(exc))
            got = False
        if got and not self.leader:
            self.leader = True
            log.info("leadership_acquired", owner=self.rt.owner)
            self._submit_job(self._catch_up, "catch_up")
            # A poll killed half-way, or batches that ended while we were down: look now, not in 30 minutes.
            self._schedule_poll(STARTUP_POLL_SECONDS)
            self.poll_delay = None  # (the next poll then comes after poll_minutes, as always)
        elif not got and self.leader:
            self.leader = False
            log.warning("leadership_lost", owner=self.rt.owner)
        elif not got and not self.leader and not getattr(self, "_standby_logged", False):
            self._standby_logged = True
            log.info("standby", reason="another instance holds the leader lease")

    def _release_lease(self) -> None:
        try:
            with self.rt.engine.begin() as conn:
                state.release_lease(conn, state.LEADER_KEY, self.rt.owner)
        except Exception as exc:  # shutting down anyway; the lease expires by itself
            log.warning("lease_release_failed", error=str(exc))

    # -- scheduling -----------------------------------------------------------------------------------

    def _schedule_jobs(self) -> None:
        assert self.scheduler is not None
        zone = self.rt.config.schedule.zone
        for job in JOBS:
            self.scheduler.add_job(
                self._scheduled,
                scheduling.SlotTrigger(self.cron(job), zone, self.offset),
                args=[job],
                id=job,
                name=job,
                replace_existing=True,
            )
        self._schedule_poll(self.rt.config.schedule.poll_minutes * 60)

    def _schedule_poll(self, delay: float) -> None:
        if self.scheduler is None:
            return
        self.poll_delay = delay
        self.scheduler.add_job(
            self._poll,
            DateTrigger(run_date=datetime.now(UTC) + timedelta(seconds=delay)),
            id="poll",
            name="poll",
            replace_existing=True,
        )

    def _submit_job(self, func: Callable[..., Any], name: str, *args: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.add_job(func, args=list(args), id=f"{name}-{logs.new_run_id()}", name=name)

    def _catch_up(self) -> None:
        """On becoming leader: run the latest missed slot of each job once, oldest slot first."""
        now = self.now()
        todo: list[tuple[datetime, str]] = []
        with self.rt.engine.connect() as conn:
            for job in JOBS:
                last = state.last_slot(conn, job)
                slot = scheduling.catch_up_slot(self.cron(job), self.rt.config.schedule.zone, last, now)
                if slot is not None:
                    log.info(
                        "catching_up", job=job, slot=slot.isoformat(), last_slot=last and last.isoformat()
                    )
                    todo.append((slot, job))
        for job in self.run_now:
            slot = scheduling.latest_fire(self.cron(job), self.rt.config.schedule.zone, now) or now
            todo.append((slot, job))
        self.run_now = []
        for slot, job in sorted(todo):
            self.run_slot(job, slot)
        self._rerun(recovery.due_reruns(self.rt, self.now(), JOBS))

    def _rerun(self, reruns: list[recovery.Rerun]) -> None:
        for r in sorted(reruns, key=lambda r: r.slot):
            log.info("rerunning_slot", job=r.job, slot=r.slot.isoformat(), attempt=r.attempt, why=r.why)
            self.run_slot(r.job, r.slot, r.attempt)

    def _recovery_tick(self) -> None:
        """etl.recovery's rules, every few seconds while leader: settle what dead processes left, re-run
        crashed or passing-partial slots."""
        if not self.leader or self.stop_event.is_set():
            return
        if not self._recovering and time.monotonic() - self._recovery_at < recovery.IDLE_SECONDS:
            return  # nothing was pending at the last look: look again once a minute, not every tick
        self._recovery_at = time.monotonic()
        try:
            with logs.run_context("recovery"):
                out = recovery.settle(self.rt)
                returned = out is not None and (out.released_claims + out.released_unknown) > 0
                due = recovery.due_reruns(self.rt, self.now(), JOBS, rows_returned=returned)
                self._rerun(due)
                self._recovering = out is not None or bool(due) or recovery.retry_pending(self.rt, self.now())
        except Exception as exc:  # recovery loop: the next tick tries again
            self._recovering = True
            self._failed("recovery_failed", exc)

    def _failed(self, event_name: str, exc: Exception) -> str:
        """Log a failure the loop survives: a right the database refused in one line (the owner's fix is
        `etl db grants`), anything else with its traceback. Returns the detail logged."""
        refused = denied(exc, self.rt.engine.url.username)
        if refused is not None:
            log.error(event_name, error=str(refused))
            return str(refused)
        # a full disk or a read-only database is named as such (`etl status` shows the detail)
        detail = str(environmental(exc) or f"{type(exc).__name__}: {exc}")
        log.exception(event_name, error=detail if event_name == "job_failed" else str(exc))
        return detail

    def _scheduled(self, job: str) -> None:
        slot = scheduling.latest_fire(self.cron(job), self.rt.config.schedule.zone, self.now())
        if slot is not None:
            self.run_slot(job, slot)

    def run_slot(self, job: str, slot: datetime, attempt: int = 1) -> str | None:
        """Claim (job, slot, attempt) in etl_runs and run it. Returns the outcome, or None if not run here."""
        if self.stop_event.is_set() or not self.leader:
            return None
        with logs.run_context(job) as run_id:
            with self.rt.engine.begin() as conn:
                claimed = state.start_run(conn, job, slot, run_id, self.rt.owner, self.now(), attempt)
            if not claimed:
                log.info("slot_taken", slot=slot.isoformat(), reason="another run has this slot")
                return None
            log.info("job_started", slot=slot.isoformat(), attempt=attempt)
            outcome, detail = "failed", None
            self.slot = slot
            self._enter(job)
            try:
                outcome, detail = self._job_body(job)
            except SubmissionPaused as exc:
                outcome, detail = "paused", str(exc)
                log.error("submission_paused", reason=str(exc))
            except Exception as exc:  # recovery loop: record the failure and go on to the next slot
                detail = self._failed("job_failed", exc)
            finally:
                self._leave()
                with self.rt.engine.begin() as conn:
                    state.finish_run(conn, run_id, outcome, detail, self.now())
                if outcome != "ok":
                    self._recovering = True
                log.info("job_finished", outcome=outcome, detail=detail)
        return outcome

    def _enter(self, job: str) -> None:
        self.current = job
        self.progress_at = time.monotonic()
        self._idle.clear()
        self.notifier.status(f"running {job}")

    def _leave(self) -> None:
        self.current = None
        self._idle.set()

    def _job_body(self, job: str) -> tuple[str, str]:
        if job == "submit":
            out = pipeline.submit(self.rt)
            detail = f"{out.documents} document(s) in {out.batches} batch(es), {out.rejected} rejected"
            if out.unknown:
                detail += f", {out.unknown} create(s) left for reconciliation"
            if out.waiting:
                detail += f", {out.waiting} waiting for the nightly budget"
            if out.batches:
                self._schedule_poll(self.rt.config.schedule.poll_minutes * 60)
            with self.rt.engine.connect() as conn:
                waiting = len(intents.with_status(conn, BatchStatus.UNKNOWN))
            if not out.stopped and waiting:
                # Rows of a create whose outcome is not known yet: this slot is not done (etl.recovery).
                return "partial", f"{detail}; {waiting} create(s) awaiting reconciliation"
            if not out.stopped:
                return "ok", detail
            detail += f"; stopped: {out.stopped}"
            if out.stopped == "stop requested":
                return "interrupted", detail
            return ("paused" if out.stopped.startswith("paused") else "partial"), detail
        col = pipeline.collect(self.rt)
        detail = (
            f"{col.batches_collected} batch(es) collected: {col.succeeded} succeeded, {col.requeued} re-queued, "
            f"{col.dead} dead"
        )
        if col.problems:
            detail += f"; {len(col.problems)} problem(s): {col.problems[0]}"
        if self.stop_event.is_set():
            return "interrupted", detail
        with self.rt.engine.connect() as conn:
            written = self.slot is not None and recovery.report_written(conn, self.slot)
        if written:  # the crashed attempt got as far as the report: one report per morning
            log.info("morning_report_exists", slot=self.slot and self.slot.isoformat())
        else:
            report.morning(self.rt)
        return "ok", detail

    def _poll(self) -> None:
        """Collect batches that ended since the last look; poll less often while nothing is pending."""
        sch = self.rt.config.schedule
        pending = False
        if self.leader and not self.stop_event.is_set():
            with logs.run_context("poll"):
                try:  # unknown creates and dead processes' intents: settled here too, not only by a submit
                    recovery.settle(self.rt)
                except Exception as exc:  # recovery loop: the next poll tries again
                    self._failed("poll_reconcile_failed", exc)
                with self.rt.engine.connect() as conn:
                    pending = bool(intents.open_intents(conn))
                if pending:
                    self._enter("poll")
                    try:
                        out = pipeline.collect(self.rt)
                        log.info("poll_finished", collected=out.batches_collected, succeeded=out.succeeded)
                    except Exception as exc:  # recovery loop: the next poll tries again
                        self._failed("poll_failed", exc)
                    finally:
                        self._leave()
                    with self.rt.engine.connect() as conn:
                        pending = bool(intents.open_intents(conn))
        delay = scheduling.next_poll_delay(
            self.poll_delay, pending, sch.poll_minutes * 60, sch.poll_max_minutes * 60
        )
        if not self.stop_event.is_set():
            self._schedule_poll(delay)

    # -- reload and shutdown --------------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        old = self.rt.config
        path = None if old.source == "<defaults>" else Path(old.source)
        try:
            new = config_mod.load(self.env, path)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc), kept="the previous configuration")
            self.notifier.send("READY=1")
            return
        needs_restart = [
            name
            for name in ("database_url", "warehouse_url", "base_url", "api_timeout_seconds")
            if getattr(new, name) != getattr(old, name)
        ]
        if new.api_key != old.api_key:
            needs_restart.append("api_key")
        if new.metrics != old.metrics:
            needs_restart.append("metrics.listen")  # the page stays where it is served until a restart
        keep = {
            n: getattr(old, n)
            for n in ("database_url", "warehouse_url", "base_url", "api_timeout_seconds", "metrics")
        }
        self.rt.config = dataclasses.replace(new, api_key=old.api_key, **keep)
        logs.set_level(new.log_level)
        if new.schedule != old.schedule and self.scheduler is not None:
            self._schedule_jobs()
        log.info(
            "config_reloaded",
            source=new.source,
            schedule_changed=new.schedule != old.schedule,
            needs_restart=needs_restart or None,
        )
        if needs_restart:
            log.warning("reload_partial", settings=needs_restart, hint="restart the service to apply these")
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")

    def _shutdown(self) -> None:
        self.stop_event.set()
        self.notifier.stopping("stopping: finishing the current step")
        log.info("daemon_stopping", current_job=self.current)
        finished = self._idle.wait(self.stop_grace)
        if self.live is not None:
            self.live.stop(self.stop_grace)  # the calls in flight end and are recorded
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.metrics is not None:
            self.metrics.stop()
        self._release_lease()
        self.rt.life.release()
        if not finished:
            # Every step is resumable from the database (the reconciler settles an interrupted
            # create), so leaving now is safe; waiting longer would only get us SIGKILLed.
            log.warning("job_abandoned", job=self.current, waited_seconds=self.stop_grace)
            log.info("daemon_stopped")
            sys.stderr.flush()
            os._exit(0)
        log.info("daemon_stopped")
        self.notifier.close()


def run_daemon(rt: Runtime) -> int:
    daemon = Daemon(rt, Notifier.from_env())
    daemon.install_signals()
    return daemon.run()
