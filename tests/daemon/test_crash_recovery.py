"""A real `etl run` SIGKILLed at a random moment inside a job, restarted at once: it picks up within a minute.

Each case is one schedule: a database (SQLite or PostgreSQL), a job (the nightly submit, the poll between,
the morning collect and report), and a kill: at a named failpoint inside the job, or from outside at a
random moment after the job started. The daemon runs with the shipped config/etl.toml; only the clock is
moved (ETL_CLOCK_OFFSET_SECONDS and the emulator's virtual clock, together) to just after the slot.
The restarted process must finish the job: every document sent (submit), every ended batch collected
(poll), the collect completed and that morning's report written once (collect); the time from the restart
to that point is measured and must be <= 60 s. A completion `etl collect` follows, and every invariant of
docs/survival.md is judged by tests/reliability/checker.py.

CI runs `ETL_DAEMON_KILLS` (3) seeds per job x database x kill style = 36 schedules, `PARALLEL` (6) side
by side in one test (each with its own emulator and database); `ETL_DAEMON_KILLS=20` and
`ETL_DAEMON_KILL_DOCS=5000` make a nightly-sized run. The restart-to-done times are printed at the end
(pytest -s) and written to `daemon-recovery-times.json` in pytest's temporary directory. A failing group
reruns alone with `-k "submit-sqlite-random-1"`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import insert

from etl import config as config_mod
from etl import pipeline
from etl.emulator import EmulatorConfig, EmulatorControl, EmulatorServer
from etl.store.engine import make_engine
from etl.store.schema import runs as runs_table
from tests.conftest import write_config
from tests.daemon.conftest import KEY, EtlProcess, pg_database, prepare_db, query, wait_for
from tests.harness import Harness, build
from tests.reliability import checker

SEEDS = int(os.environ.get("ETL_DAEMON_KILLS", "3"))
DOCS = int(os.environ.get("ETL_DAEMON_KILL_DOCS", "30"))
LIMIT_SECONDS = 60.0
JOBS = ("submit", "poll", "collect")
DBS = ("sqlite", "postgresql")
STYLES = ("failpoint", "random")
SUBMIT_POINTS = (
    "submit.after_claim",
    "submit.after_build",
    "submit.after_fence",
    "submit.during_create",
    "submit.after_create",
    "submit.after_record",
)
COLLECT_POINTS = ("collect.after_retrieve", "collect.before_mark_collected")  # (mid_stream: > 1 chunk)
PARALLEL = int(os.environ.get("ETL_DAEMON_KILLS_PARALLEL", "6"))  # schedules run side by side
CASES = [  # mixed, so each group of PARALLEL has different jobs and databases side by side
    f"{job}-{db}-{style}-{seed}" for seed in range(SEEDS) for style in STYLES for db in DBS for job in JOBS
]
TIMES: list[dict[str, Any]] = []
T = TypeVar("T")
MIGRATING = threading.Lock()


@pytest.fixture(scope="module", autouse=True)
def timing_summary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if not TIMES:
        return
    out = tmp_path_factory.getbasetemp() / "daemon-recovery-times.json"
    out.write_text(json.dumps(TIMES, indent=1), encoding="utf-8")
    lines = []
    for job in JOBS:
        t = [x["seconds"] for x in TIMES if x["job"] == job]
        inside = sum(1 for x in TIMES if x["job"] == job and x["inside"])
        if t:
            lines.append(
                f"{job:<8} n={len(t):<3} killed inside the job {inside:<3} restart->done median "
                f"{statistics.median(t):.1f} s  max {max(t):.1f} s"
            )
    print("\n[daemon crash recovery] " + "\n[daemon crash recovery] ".join(lines) + f"\n({out})")


def midnight_offset(control: EmulatorControl, after_midnight: timedelta) -> float:
    """Move the emulator's clock to the next UTC midnight + `after_midnight`; the offset `etl` needs too."""
    now = datetime.now(UTC)
    target = (
        datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC) + after_midnight
    )
    offset = (target - now).total_seconds()
    control.advance(offset)
    return offset


def seed_history(url: str, *runs: tuple[str, datetime]) -> None:
    """Earlier nights' finished runs, as a daemon that has been running for a while leaves them: the
    daemon started just after a slot then catches up on it at once (like a daemon that was up at the slot)."""
    engine = make_engine(url)
    with engine.begin() as conn:
        for job, slot in runs:
            conn.execute(
                insert(runs_table).values(
                    job=job,
                    slot=slot,
                    run_id=uuid.uuid4().hex,
                    host="earlier",
                    started_at=slot,
                    ended_at=slot,
                    outcome="ok",
                )
            )
    engine.dispose()


def statuses(url: str) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in query(url, "SELECT status, count(*) FROM etl_queue GROUP BY status")}


def unsettled(url: str) -> int:
    sql = "SELECT count(*) FROM etl_batches WHERE status IN ('claimed', 'sending', 'unknown')"
    return int(query(url, sql)[0][0])


def attempts(url: str, job: str) -> list[tuple[int, str]]:
    sql = "SELECT attempt, outcome FROM etl_runs WHERE job = :j AND host <> 'earlier' ORDER BY slot, attempt"
    return [(int(a), o) for a, o in query(url, sql, j=job)]


class Schedule:
    """One kill-and-restart schedule with its own database, emulator (own virtual clock) and folder, so
    several run side by side."""

    def __init__(self, case: str, root: Path) -> None:
        self.case = case
        self.job, self.db, self.style, _ = case.split("-")
        self.rng = random.Random(case)
        self.dir = root / case
        self.dir.mkdir(parents=True)
        self.emulator = EmulatorServer(EmulatorConfig(port=0, processing_seconds=1, require_key=KEY)).start()
        self.control = EmulatorControl(self.emulator.base_url)
        self._pg = pg_database() if self.db == "postgresql" else None
        self.url = next(self._pg) if self._pg else f"sqlite:///{self.dir / 'etl.db'}"
        self.procs: list[EtlProcess] = []

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        self.emulator.stop()
        if self._pg is not None:
            for _ in self._pg:
                pass

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ETL_", "ANTHROPIC_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
        }
        env.update(
            ETL_DATABASE_URL=self.url,
            ETL_CONFIG=str(write_config(self.dir)),  # the shipped settings, untouched
            ANTHROPIC_API_KEY=KEY,
            ANTHROPIC_BASE_URL=self.emulator.base_url,
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def spawn(self, env: dict[str, str]) -> EtlProcess:
        n = len(self.procs)
        out, err = self.dir / f"etl-{n}.out", self.dir / f"etl-{n}.err"
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl.cli", "run"],
            env=env,
            cwd=self.dir,
            stdout=out.open("wb"),
            stderr=err.open("wb"),
        )
        p = EtlProcess(proc, out, err)
        self.procs.append(p)
        return p

    def in_process(self, offset: float, job: Callable[[Harness], T]) -> T:
        cfg = config_mod.load(self.env(), None)
        rt = build(cfg, clock=lambda: datetime.now(UTC) + timedelta(seconds=offset))
        try:
            return job(rt)
        finally:
            rt.close()

    def run(self) -> dict[str, Any]:
        job, url, control, rng = self.job, self.url, self.control, self.rng
        with MIGRATING:  # Alembic's `op` is one global per process: one migration at a time
            prepare_db(url, DOCS)
        day = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        yesterday = day - timedelta(days=1)
        offset = midnight_offset(control, timedelta(seconds=20))
        if job == "submit":
            seed_history(url, ("submit", yesterday), ("collect", yesterday + timedelta(hours=7)))
            points = SUBMIT_POINTS
        else:
            # The night's submit ran after midnight (set up in this process: only the daemon is under test).
            sub = self.in_process(
                offset, lambda rt: pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
            )
            assert sub.documents == DOCS and not sub.stopped, sub
            later = timedelta(hours=7 if job == "collect" else 3)
            control.advance(later.total_seconds())
            offset += later.total_seconds()
            history = [("submit", day), ("collect", yesterday + timedelta(hours=7))]
            if job == "poll":
                history.append(("collect", day + timedelta(hours=7)))  # no collect slot due: only the poll
            seed_history(url, *history)
            points = COLLECT_POINTS

        env = self.env(ETL_CLOCK_OFFSET_SECONDS=str(offset))
        fp = ""
        if self.style == "failpoint":
            # Each submit failpoint once per CI run (3 seeds x 2 databases = 6 points), then at random.
            n = int(self.case.rsplit("-", 1)[1]) * len(DBS) + DBS.index(self.db)
            point = points[n] if n < len(points) else rng.choice(points)
            fp = f"{point}=kill"
            if point == "submit.during_create":  # the API makes the batch; nobody reads the answer
                control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "delay_seconds": 2}])
        first = self.spawn(env | ({"ETL_FAILPOINTS": fp} if fp else {}))
        if self.style == "random":
            # Wait until the job is under way, then kill it from outside at a random moment.
            marker = '"job": "poll"' if job == "poll" else '"event": "job_started"'
            wait_for(lambda: marker in first.output(), timeout=60, what=f"{job} to start")
            time.sleep(rng.uniform(0.0, 0.1 if job == "poll" else 0.4))  # the random moment IS the fault
            ended = "poll_finished" if job == "poll" else "job_finished"
            inside = first.proc.poll() is None and not first.logged(ended)
            first.kill()
        else:
            first.proc.wait(60)
            inside = True
        assert first.proc.returncode == -signal.SIGKILL, first.output()[-3000:]
        control.clear_faults()

        restarted_at = time.monotonic()
        second = self.spawn(env)

        def finished() -> bool:
            rows = statuses(url)
            if job != "poll" and attempts(url, job)[-1][1] in ("running", "crashed"):
                return False  # the slot is done when a run of it finished
            if job == "submit":
                return rows.get("submitted", 0) + rows.get("done", 0) == DOCS and not unsettled(url)
            open_ = "SELECT count(*) FROM etl_batches WHERE status IN ('submitted', 'ended')"
            if rows.get("done", 0) != DOCS or int(query(url, open_)[0][0]):
                return False  # every document in the warehouse and every batch marked collected
            if job == "collect":
                reports = int(query(url, "SELECT count(*) FROM etl_reports")[0][0])
                return reports >= 1
            return True

        wait_for(finished, timeout=LIMIT_SECONDS + 30, what=f"{self.case}: the restarted daemon to finish")
        took = time.monotonic() - restarted_at
        assert took <= LIMIT_SECONDS, f"{self.case}: {took:.1f} s from restart to done"
        assert not second.logged("standby"), "the restarted daemon waited for its dead predecessor's lease"
        history = attempts(url, job) if job != "poll" else []
        if history:
            assert history[-1][1] == "ok", history
            assert "running" not in [o for _, o in history], history
            if inside and history[0][1] != "ok":
                assert history[0][1] == "crashed" and len(history) >= 2, history
        if job == "collect":
            assert int(query(url, "SELECT count(*) FROM etl_reports")[0][0]) == 1  # once per morning
        wait_for(lambda: second.logged("daemon_started"), timeout=60, what="the restarted daemon to be up")
        assert second.terminate() == 0, second.output()[-3000:]

        if job == "submit":  # completion: the batches end, their results are collected (in this process)
            control.advance(600)
            offset += 600
            self.in_process(
                offset, lambda rt: pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop)
            )

        engine = make_engine(url)
        try:
            snap = checker.snapshot(engine, engine, control.ledger())
        finally:
            engine.dispose()
        verdict = checker.check(
            snap,
            scenario=self.case,
            max_attempts=3,
            now=datetime.now(UTC) + timedelta(seconds=offset),
            reconcile_cycle=timedelta(minutes=5),
            final=True,
            fault=(
                first.proc.returncode == -signal.SIGKILL,
                f"killed with SIGKILL ({fp or 'random moment'})",
            ),
        )
        assert verdict.ok, f"{self.case}: {verdict.failures()}"
        assert control.ledger()["requests_created"] == DOCS, f"{self.case}: a document was sent twice"
        return {
            "case": self.case,
            "job": job,
            "db": self.db,
            "kill": fp or "random moment",
            "seconds": round(took, 2),
            "inside": inside,
            "attempts": history,
        }


GROUPS = [CASES[i : i + PARALLEL] for i in range(0, len(CASES), PARALLEL)]


@pytest.mark.parametrize("group", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_sigkill_inside_a_job_then_an_immediate_restart_finishes_it_within_a_minute(
    group: list[str], tmp_path: Path
) -> None:
    schedules = [Schedule(case, tmp_path) for case in group]
    try:
        with ThreadPoolExecutor(max_workers=len(schedules)) as pool:
            futures = [pool.submit(s.run) for s in schedules]
            failures = []
            for s, f in zip(schedules, futures, strict=True):
                try:
                    TIMES.append(f.result())
                except Exception as exc:  # report every schedule of the group, not only the first
                    failures.append(f"{s.case}: {exc}")
        assert not failures, "\n".join(failures)
    finally:
        for s in schedules:
            s.close()
