"""The daemon's jobs, one scheduled run at a time: claim `(job, slot, attempt)` in `etl_runs`, run the
submit or the collect (+ morning report), record how it ended as a typed `RunOutcome`.

The daemon (etl/daemon.py) decides when and whether to run (leader lease, schedule, catch-up); this
module runs what it is given, in the scheduler's one worker thread, and tells the watchdog
(etl/watchdog.py) which job is running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum

import structlog

from etl import collector, logs, pipeline, recovery, report, submitter
from etl.api import Api
from etl.errors import SubmissionPaused, environmental
from etl.life import Identity
from etl.notify import Notifier
from etl.settings import Settings
from etl.store import batches as intents
from etl.store import state
from etl.store.databases import Databases
from etl.store.engine import denied
from etl.store.schema import BatchStatus
from etl.watchdog import Watchdog

log = structlog.get_logger("etl.daemon")


class RunOutcome(StrEnum):
    """How a scheduled run ended, as `etl_runs.outcome` records it (etl.recovery reads it back)."""

    OK = "ok"
    PARTIAL = "partial"  # rows left for reconciliation, or stopped short: etl.recovery runs it again
    PAUSED = "paused"  # submission is paused (a systemic answer from the API)
    INTERRUPTED = "interrupted"  # a stop was asked
    FAILED = "failed"


class Jobs:
    def __init__(
        self,
        conf: Settings,
        db: Databases,
        api: Api,
        me: Callable[[], Identity],
        clock: Callable[[], datetime],
        notifier: Notifier,
        watchdog: Watchdog,
        stop: threading.Event,
        schedule_poll: Callable[[float], None],
    ) -> None:
        # `conf`: each run takes the configuration current when it starts (the daemon's reload swaps it);
        # `me`: who we are now (the daemon's proof of life may change the owner string).
        self.conf, self.db, self.api, self.me, self.clock = conf, db, api, me, clock
        self.notifier = notifier
        self.watchdog = watchdog
        self.stop = stop
        self.schedule_poll = schedule_poll  # in so many seconds (the daemon's scheduler)
        self.slot: datetime | None = None  # the slot of the job running now

    def run_slot(self, job: str, slot: datetime, attempt: int = 1) -> RunOutcome | None:
        """Claim (job, slot, attempt) in etl_runs and run it. Returns the outcome, or None if another run
        has the slot."""
        with logs.run_context(job) as run_id:
            with self.db.main.begin() as conn:
                claimed = state.start_run(conn, job, slot, run_id, self.me().owner, self.clock(), attempt)
            if not claimed:
                log.info("slot_taken", slot=slot.isoformat(), reason="another run has this slot")
                return None
            log.info("job_started", slot=slot.isoformat(), attempt=attempt)
            outcome: RunOutcome = RunOutcome.FAILED
            detail: str | None = None
            self.slot = slot
            self.enter(job)
            try:
                outcome, detail = self.body(job)
            except SubmissionPaused as exc:
                outcome, detail = RunOutcome.PAUSED, str(exc)
                log.error("submission_paused", reason=str(exc))
            except Exception as exc:  # recovery loop: record the failure and go on to the next slot
                detail = self.failed("job_failed", exc)
            finally:
                self.watchdog.leave()
                with self.db.main.begin() as conn:
                    state.finish_run(conn, run_id, outcome, detail, self.clock())
                log.info("job_finished", outcome=outcome, detail=detail)
        return outcome

    def enter(self, job: str) -> None:
        self.watchdog.enter(job)
        self.notifier.status(f"running {job}")

    def body(self, job: str) -> tuple[RunOutcome, str]:
        cfg = self.conf.current
        if job == "submit":
            out = pipeline.submit(cfg, self.db, self.api, self.me(), self.clock, self.watchdog.should_stop)
            if out.batches:
                self.schedule_poll(cfg.schedule.poll_minutes * 60)
            with self.db.main.connect() as conn:
                waiting = len(intents.with_status(conn, BatchStatus.UNKNOWN))
            return submit_outcome(out, waiting)
        detail = collect_detail(
            pipeline.collect(cfg, self.db, self.api, self.me(), self.clock, self.watchdog.should_stop)
        )
        if self.stop.is_set():
            return RunOutcome.INTERRUPTED, detail
        with self.db.main.connect() as conn:
            written = self.slot is not None and recovery.report_written(conn, self.slot)
        if written:  # the crashed attempt got as far as the report: one report per morning
            log.info("morning_report_exists", slot=self.slot and self.slot.isoformat())
        else:
            report.morning(cfg, self.db, self.clock())
        return RunOutcome.OK, detail

    def poll_collect(self) -> None:
        """The adaptive poll's collect of batches that ended (no `etl_runs` row: it is no slot)."""
        self.enter("poll")
        try:
            out = pipeline.collect(
                self.conf.current, self.db, self.api, self.me(), self.clock, self.watchdog.should_stop
            )
            log.info("poll_finished", collected=out.batches_collected, succeeded=out.succeeded)
        except Exception as exc:  # recovery loop: the next poll tries again
            self.failed("poll_failed", exc)
        finally:
            self.watchdog.leave()

    def failed(self, event_name: str, exc: Exception) -> str:
        return log_failure(event_name, exc, self.db.main.url.username)


def log_failure(event_name: str, exc: Exception, username: str | None) -> str:
    """Log a failure the loop survives: a right the database refused in one line (the owner's fix is
    `etl db grants`), anything else with its traceback. Returns the detail logged."""
    refused = denied(exc, username)
    if refused is not None:
        log.error(event_name, error=str(refused))
        return str(refused)
    # a full disk or a read-only database is named as such (`etl status` shows the detail)
    detail = str(environmental(exc) or f"{type(exc).__name__}: {exc}")
    log.exception(event_name, error=detail if event_name == "job_failed" else str(exc))
    return detail


def submit_outcome(out: submitter.SubmitOutcome, unknown_creates: int) -> tuple[RunOutcome, str]:
    """A submit run's outcome and the detail `etl_runs` records, from what the submitter returned and the
    creates still awaiting reconciliation."""
    detail = f"{out.documents} document(s) in {out.batches} batch(es), {out.rejected} rejected"
    if out.unknown:
        detail += f", {out.unknown} create(s) left for reconciliation"
    if out.waiting:
        detail += f", {out.waiting} waiting for the nightly budget"
    if not out.stopped and unknown_creates:
        # Rows of a create whose outcome is not known yet: this slot is not done (etl.recovery).
        return RunOutcome.PARTIAL, f"{detail}; {unknown_creates} create(s) awaiting reconciliation"
    if not out.stopped:
        return RunOutcome.OK, detail
    detail += f"; stopped: {out.stopped}"
    if out.interrupted:
        return RunOutcome.INTERRUPTED, detail
    return (RunOutcome.PAUSED if out.paused is not None else RunOutcome.PARTIAL), detail


def collect_detail(col: collector.CollectOutcome) -> str:
    detail = (
        f"{col.batches_collected} batch(es) collected: {col.succeeded} succeeded, {col.requeued} re-queued, "
        f"{col.dead} dead"
    )
    if col.problems:
        detail += f"; {len(col.problems)} problem(s): {col.problems[0]}"
    return detail
