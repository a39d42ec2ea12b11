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

SIGTERM/SIGINT make the jobs' `should_stop` true: the submitter and collector stop between batches, the
daemon releases the lease, says STOPPING=1 and exits 0. SIGHUP re-reads the configuration file: the
schedule, logging level and submit/collect/task settings apply at once; database and API settings
need a restart (the daemon says so in the log).

Beside it: etl/signals.py (the handlers and the main loop's sleep), etl/watchdog.py (is the job making
progress?), etl/jobs.py (one scheduled run: claim the slot, run the job, record its `RunOutcome`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

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
    reconciler,
    recovery,
    scheduling,
)
from etl.api import Api
from etl.clock import utcnow, wall
from etl.config import Config, ScheduleSettings
from etl.errors import ConfigError
from etl.jobs import Jobs, RunOutcome
from etl.life import Identity
from etl.notify import Notifier
from etl.settings import Settings
from etl.signals import Signals
from etl.store import batches as intents
from etl.store import grants, migrate, state
from etl.store.databases import Databases
from etl.watchdog import STALL_ENV, Watchdog, default_stall

log = structlog.get_logger("etl.daemon")

JOBS = ("submit", "collect")
RUN_NOW_ENV = "ETL_DAEMON_RUN_NOW"  # hidden: "submit,collect" runs those jobs at once (tests, demos)
STOP_GRACE_ENV = "ETL_DAEMON_STOP_GRACE_SECONDS"  # how long a stop waits for the current step
MAX_TICK_SECONDS = 60.0
DEFAULT_STOP_GRACE = 60.0  # well inside the unit's TimeoutStopSec=90
STARTUP_POLL_SECONDS = 1.0  # a poll killed half-way resumes this soon after a restart


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
    def __init__(
        self,
        cfg: Config,
        db: Databases,
        api: Api,
        notifier: Notifier,
        env: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        me: Identity | None = None,
    ) -> None:
        # The configuration its long-lived parts (jobs, live worker, metrics page) read while they run:
        # `reload` swaps it whole, and nothing else changes it.
        self.settings = Settings(cfg)
        self.db, self.api, self.clock = db, api, clock
        self.me = me if me is not None else Identity()  # `life.hold` gives the owner string its proof of life
        self.notifier = notifier
        self.env = os.environ if env is None else env
        self.signals = Signals()
        self.stop_event = self.signals.stop
        self.leader = False
        self.poll_delay: float | None = None
        self.stop_grace = _float_env(self.env, STOP_GRACE_ENV, DEFAULT_STOP_GRACE)
        stall_limit = _float_env(self.env, STALL_ENV, default_stall(cfg))
        self.watchdog = Watchdog(stall_limit, self.stop_event)
        self._recovering = True  # etl.recovery has something pending: apply its rules every tick
        self._recovery_at = 0.0
        self.run_now = [j for j in self.env.get(RUN_NOW_ENV, "").replace(" ", "").split(",") if j in JOBS]
        self._standby_logged = False
        self.scheduler: BackgroundScheduler | None = None
        self.live: live.Background | None = None
        self.metrics: metrics.Server | None = None
        self.should_stop = self.watchdog.should_stop
        self.jobs = Jobs(
            self.settings,
            db,
            api,
            lambda: self.me,
            clock,
            notifier,
            self.watchdog,
            self.stop_event,
            self._schedule_poll,
        )

    # -- time ---------------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.clock()

    @property
    def offset(self) -> timedelta:
        """How far the daemon's clock is from the wall clock (non-zero only in tests and the demo)."""
        return self.clock() - wall()

    def cron(self, job: str) -> str:
        return _cron(self.settings.current.schedule, job)

    # -- the service ----------------------------------------------------------------------------------

    def run(self) -> int:
        _check(self.settings.current, self.db, self.notifier)
        # Our proof of life for as long as we live (etl.life): PostgreSQL, a session advisory lock
        # (re-taken on the next tick if the connection drops); SQLite, a flock beside the database.
        self.me = life.hold(self.db.main, self.me)
        event.listen(self.db.main, "commit", self.watchdog.on_commit)
        # the Prometheus page, on every instance (docs/deploy.md)
        self.metrics = metrics.serve(self.settings, self.db, self.me.owner, self.clock)
        cfg = self.settings.current
        _reconcile(cfg, self.db, self.api, self.me.owner, self.clock, self.should_stop, self.notifier)
        self.scheduler = _new_scheduler()
        self._schedule_jobs()
        self.scheduler.add_job(
            self._recovery_tick,
            IntervalTrigger(seconds=recovery.TICK_SECONDS),
            id="recovery",
            name="recovery",
            replace_existing=True,
        )
        self.scheduler.start()
        self.live = live.start_background(
            self.settings, self.db, self.api, self.clock, self.stop_event
        )  # urgent rows, on every instance
        _log_started(
            self.settings.current,
            self.me.owner,
            self.notifier.watchdog_interval,
            self.watchdog.stall_limit,
            self.scheduler,
        )
        self.notifier.ready(self._status_line())
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return 0

    def _main_loop(self) -> None:
        while not self.stop_event.is_set():
            if self.signals.reload.is_set():
                self.signals.reload.clear()
                self.reload()
            self._lease_tick()
            if self.scheduler is not None:
                # After a suspend the scheduler's monotonic wait oversleeps; nudging it each tick makes
                # a missed slot fire (once, coalesced) within a tick of waking up.
                self.scheduler.wakeup()
            if self.watchdog.making_progress():
                self.notifier.watchdog()
            else:
                silent = round(self.watchdog.silent_seconds())
                log.error("job_stalled", job=self.watchdog.current, silent_seconds=silent)
            self.notifier.status(self._status_line())
            # Asleep until the next tick or a signal; the scheduler's own thread fires the jobs.
            tick = _tick_seconds(
                self.settings.current.schedule.leader_lease_seconds, self.notifier.watchdog_interval
            )
            self.signals.sleep(tick)

    def _status_line(self) -> str:
        if self.stop_event.is_set() or self.watchdog.current or not self.leader or self.scheduler is None:
            return _status_text(self.stop_event.is_set(), self.watchdog.current, self.leader, [])
        nxt = _next_slots(self.scheduler, self.offset, self.settings.current.schedule.zone)
        return _status_text(False, None, True, nxt)

    # -- leadership -----------------------------------------------------------------------------------

    def _lease_tick(self) -> None:
        ttl = timedelta(seconds=self.settings.current.schedule.leader_lease_seconds)
        try:
            self.me = life.hold(self.db.main, self.me)  # re-taken if its connection dropped
            with self.db.main.begin() as conn:
                got = state.acquire_lease(conn, state.LEADER_KEY, self.me.owner, self.now(), ttl)
            if not got:  # held: by a process that is gone? Then at once, not at lease expiry.
                got = recovery.take_over_leader(self.db, self.me.owner, self.now(), ttl)
        except Exception as exc:  # recovery loop: a database blip must not kill the service
            log.warning("lease_renewal_failed", error=str(exc))
            got = False
        if got and not self.leader:
            self.leader = True
            log.info("leadership_acquired", owner=self.me.owner)
            self._submit_job(self._catch_up, "catch_up")
            # A poll killed half-way, or batches that ended while we were down: look now, not in 30 minutes.
            self._schedule_poll(STARTUP_POLL_SECONDS)
            self.poll_delay = None  # (the next poll then comes after poll_minutes, as always)
        elif not got and self.leader:
            self.leader = False
            log.warning("leadership_lost", owner=self.me.owner)
        elif not got and not self.leader and not self._standby_logged:
            self._standby_logged = True
            log.info("standby", reason="another instance holds the leader lease")

    def _release_lease(self) -> None:
        try:
            with self.db.main.begin() as conn:
                state.release_lease(conn, state.LEADER_KEY, self.me.owner)
        except Exception as exc:  # shutting down anyway; the lease expires by itself
            log.warning("lease_release_failed", error=str(exc))

    # -- scheduling -----------------------------------------------------------------------------------

    def _schedule_jobs(self) -> None:
        assert self.scheduler is not None
        zone = self.settings.current.schedule.zone
        for job in JOBS:
            self.scheduler.add_job(
                self._scheduled,
                scheduling.SlotTrigger(self.cron(job), zone, self.offset),
                args=[job],
                id=job,
                name=job,
                replace_existing=True,
            )
        self._schedule_poll(self.settings.current.schedule.poll_minutes * 60)

    def _schedule_poll(self, delay: float) -> None:
        if self.scheduler is None:
            return
        self.poll_delay = delay
        self.scheduler.add_job(
            self._poll,
            DateTrigger(run_date=wall() + timedelta(seconds=delay)),  # the scheduler keeps wall time
            id="poll",
            name="poll",
            replace_existing=True,
        )

    def _submit_job(self, func: Callable[..., Any], name: str, *args: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.add_job(func, args=list(args), id=f"{name}-{logs.new_run_id()}", name=name)

    def _catch_up(self) -> None:
        """On becoming leader: run the latest missed slot of each job once, oldest slot first."""
        todo = _missed_slots(self.db, self.settings.current.schedule, self.run_now, self.now())
        self.run_now = []
        for slot, job in sorted(todo):
            self.run_slot(job, slot)
        self._rerun(recovery.due_reruns(self.settings.current.schedule, self.db, self.now(), JOBS))

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
                cfg = self.settings.current
                out = recovery.settle(cfg, self.db, self.api, self.me.owner, self.clock, self.should_stop)
                returned = out is not None and (out.released_claims + out.released_unknown) > 0
                due = recovery.due_reruns(cfg.schedule, self.db, self.now(), JOBS, rows_returned=returned)
                self._rerun(due)
                pending = recovery.retry_pending(cfg.schedule, self.db, self.now())
                self._recovering = out is not None or bool(due) or pending
        except Exception as exc:  # recovery loop: the next tick tries again
            self._recovering = True
            self.jobs.failed("recovery_failed", exc)

    def _scheduled(self, job: str) -> None:
        slot = scheduling.latest_fire(self.cron(job), self.settings.current.schedule.zone, self.now())
        if slot is not None:
            self.run_slot(job, slot)

    def run_slot(self, job: str, slot: datetime, attempt: int = 1) -> RunOutcome | None:
        """Claim (job, slot, attempt) in etl_runs and run it. Returns the outcome, or None if not run here."""
        if self.stop_event.is_set() or not self.leader:
            return None
        outcome = self.jobs.run_slot(job, slot, attempt)
        if outcome is not None and outcome is not RunOutcome.OK:
            self._recovering = True
        return outcome

    def _poll(self) -> None:
        """Collect batches that ended since the last look; poll less often while nothing is pending."""
        sch = self.settings.current.schedule
        pending = False
        if self.leader and not self.stop_event.is_set():
            with logs.run_context("poll"):
                cfg, me = self.settings.current, self.me.owner
                try:  # unknown creates and dead processes' intents: settled here too, not only by a submit
                    recovery.settle(cfg, self.db, self.api, me, self.clock, self.should_stop)
                except Exception as exc:  # recovery loop: the next poll tries again
                    self.jobs.failed("poll_reconcile_failed", exc)
                with self.db.main.connect() as conn:
                    pending = bool(intents.open_intents(conn))
                if pending:
                    self.jobs.poll_collect()
                    with self.db.main.connect() as conn:
                        pending = bool(intents.open_intents(conn))
        delay = scheduling.next_poll_delay(
            self.poll_delay, pending, sch.poll_minutes * 60, sch.poll_max_minutes * 60
        )
        if not self.stop_event.is_set():
            self._schedule_poll(delay)

    # -- reload and shutdown --------------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        old = self.settings.current
        new = _load_again(old, self.env)
        if new is not None:
            self.settings.swap(new)
            if new.schedule != old.schedule and self.scheduler is not None:
                self._schedule_jobs()
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")

    def _shutdown(self) -> None:
        self.stop_event.set()
        self.notifier.stopping("stopping: finishing the current step")
        log.info("daemon_stopping", current_job=self.watchdog.current)
        finished = self.watchdog.wait_idle(self.stop_grace)
        if self.live is not None:
            self.live.stop(self.stop_grace)  # the calls in flight end and are recorded
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.metrics is not None:
            self.metrics.stop()
        self._release_lease()
        self.me.life.release()
        if not finished:
            # Every step is resumable from the database (the reconciler settles an interrupted
            # create), so leaving now is safe; waiting longer would only get us SIGKILLed.
            log.warning("job_abandoned", job=self.watchdog.current, waited_seconds=self.stop_grace)
            log.info("daemon_stopped")
            sys.stderr.flush()
            os._exit(0)
        log.info("daemon_stopped")
        self.notifier.close()


def run_daemon(
    cfg: Config, db: Databases, api: Api, me: Identity, clock: Callable[[], datetime] = utcnow
) -> int:
    daemon = Daemon(cfg, db, api, Notifier.from_env(), clock=clock, me=me)
    daemon.signals.install()
    return daemon.run()


# -- the parts of the daemon that need none of its state ---------------------------------------------


def _check(cfg: Config, db: Databases, notifier: Notifier) -> None:
    """What must hold before anything runs: the schema, the database rights, an API key."""
    notifier.status("checking the database schema")
    migrate.check(db.main, db.warehouse)
    grants.check(db.main, db.warehouse)  # a missing right: one line now, not a job's traceback
    cfg.require_api_key()


def _reconcile(
    cfg: Config,
    db: Databases,
    api: Api,
    me: str,
    clock: Callable[[], datetime],
    should_stop: Callable[[], bool],
    notifier: Notifier,
) -> None:
    notifier.status("reconciling unfinished batch creates")
    with logs.run_context("reconcile"):
        found = recovery.sweep(db, me, clock())  # a dead predecessor's runs and intents, known at once
        out = reconciler.run(cfg, db, api, clock, should_stop)
        log.info(
            "startup_reconciled",
            adopted=out.adopted,
            still_unknown=out.still_unknown,
            crashed_runs=len(found.crashed_runs),
            dead_owner_intents=len(found.ended_leases),
        )


def _new_scheduler() -> BackgroundScheduler:
    logging.getLogger("apscheduler.scheduler").addFilter(_quiet_recovery_skips)
    return BackgroundScheduler(
        timezone=UTC,
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )


def _log_started(
    cfg: Config, owner: str, watchdog_interval: float | None, stall: float, scheduler: BackgroundScheduler
) -> None:
    sch = cfg.schedule
    log.info(
        "daemon_started",
        owner=owner,
        timezone=sch.timezone,
        submit_cron=sch.submit_cron,
        collect_cron=sch.collect_cron,
        poll_minutes=sch.poll_minutes,
        watchdog_seconds=watchdog_interval,
        stall_seconds=stall,
        next_runs=_next_runs(scheduler),
    )


def _next_runs(scheduler: BackgroundScheduler) -> dict[str, str | None]:
    """When each scheduled job runs next (wall-clock time, UTC), for the start-up log line."""
    return {
        job.id: None if job.next_run_time is None else job.next_run_time.astimezone(UTC).isoformat()
        for job in scheduler.get_jobs()
    }


def _next_slots(scheduler: BackgroundScheduler, offset: timedelta, zone: ZoneInfo) -> list[str]:
    """The next run of each job in the schedule's zone, on the daemon's clock, for the STATUS line."""
    nxt = []
    for job in (*JOBS, "poll"):
        sj = scheduler.get_job(job)
        if sj is not None and sj.next_run_time is not None:
            at = (sj.next_run_time.astimezone(UTC) + offset).astimezone(zone)
            nxt.append(f"{job} {at:%Y-%m-%d %H:%M %Z}")
    return nxt


def _tick_seconds(lease_seconds: float, watchdog_interval: float | None) -> float:
    tick = min(MAX_TICK_SECONDS, lease_seconds / 3)
    if watchdog_interval is not None:
        tick = min(tick, watchdog_interval)
    return max(tick, 0.2)


RESTART_ONLY = ("database_url", "warehouse_url", "base_url", "api_timeout_seconds")


def _reloaded(old: config_mod.Config, new: config_mod.Config) -> tuple[config_mod.Config, list[str]]:
    """The configuration a reload applies (`new`, but what only a restart applies kept from `old`), and
    the names of the settings that changed but need a restart."""
    needs_restart = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
    if new.api_key != old.api_key:
        needs_restart.append("api_key")
    if new.metrics != old.metrics:
        needs_restart.append("metrics.listen")  # the page stays where it is served until a restart
    keep = {n: getattr(old, n) for n in (*RESTART_ONLY, "metrics")}
    return dataclasses.replace(new, api_key=old.api_key, **keep), needs_restart


def _missed_slots(
    db: Databases, sch: ScheduleSettings, run_now: list[str], now: datetime
) -> list[tuple[datetime, str]]:
    """On becoming leader: the latest missed slot of each job, and the jobs asked to run now."""
    todo: list[tuple[datetime, str]] = []
    with db.main.connect() as conn:
        for job in JOBS:
            last = state.last_slot(conn, job)
            slot = scheduling.catch_up_slot(_cron(sch, job), sch.zone, last, now)
            if slot is not None:
                log.info("catching_up", job=job, slot=slot.isoformat(), last_slot=last and last.isoformat())
                todo.append((slot, job))
    for job in run_now:
        todo.append((scheduling.latest_fire(_cron(sch, job), sch.zone, now) or now, job))
    return todo


def _cron(sch: ScheduleSettings, job: str) -> str:
    return sch.submit_cron if job == "submit" else sch.collect_cron


def _load_again(old: Config, env: Mapping[str, str]) -> Config | None:
    """SIGHUP: the configuration file read again, what a reload can apply of it (None: kept the old one)."""
    path = None if old.source == "<defaults>" else Path(old.source)
    try:
        new = config_mod.load(env, path)
    except ConfigError as exc:
        log.error("reload_failed", error=str(exc), kept="the previous configuration")
        return None
    applied, needs_restart = _reloaded(old, new)
    logs.set_level(new.log_level)
    for warning in new.warnings:  # settings an older version read: loaded, ignored, said again
        log.warning("config_setting_ignored", config=new.source, warning=warning)
    log.info(
        "config_reloaded",
        source=new.source,
        schedule_changed=new.schedule != old.schedule,
        needs_restart=needs_restart or None,
    )
    if needs_restart:
        log.warning("reload_partial", settings=needs_restart, hint="restart the service to apply these")
    return applied


def _status_text(stopping: bool, current: str | None, leader: bool, next_slots: list[str]) -> str:
    """The daemon's one-line status (systemd's STATUS=, `etl status`)."""
    if stopping:
        return "stopping"
    if current:
        return f"running {current}"
    if not leader:
        return "standby: another instance holds the leader lease"
    return "idle; next: " + ", ".join(next_slots) if next_slots else "idle"
