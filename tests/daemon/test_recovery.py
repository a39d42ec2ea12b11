"""etl.recovery and etl.liveness rule by rule, on SQLite and PostgreSQL; the watchdog path with a real
`etl run` stopped by SIGSTOP inside a job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from etl import config as config_mod
from etl import liveness, recovery, status
from etl.daemon import Daemon
from etl.emulator import EmulatorControl
from etl.notify import Notifier
from etl.store import batches as intents
from etl.store import queue as q
from etl.store import state
from etl.watchdog import STALL_ENV, default_stall
from tests.daemon.conftest import EtlProcess, prepare_db, query, wait_for, write_config
from tests.daemon.test_crash_recovery import midnight_offset
from tests.harness import Harness, build

T0 = datetime(2026, 6, 4, 0, 0, 20, tzinfo=UTC)


def dead_owner() -> str:
    """The name of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        name = liveness.new_owner(child.pid)
    finally:
        child.kill()
        child.wait()
    return name


@pytest.fixture
def rt(db_url: str, tmp_path: Path) -> Iterator[Harness]:
    prepare_db(db_url, 6)
    cfg = config_mod.load({"ETL_DATABASE_URL": db_url, "ANTHROPIC_API_KEY": "k"}, write_config(tmp_path))
    runtime = build(cfg, clock=lambda: T0)
    yield runtime
    runtime.close()


def test_a_process_knows_who_is_alive_on_its_own_host() -> None:
    me = liveness.new_owner()
    parent = liveness.new_owner(os.getppid())
    assert liveness.local_verdict(me) is True
    assert liveness.local_verdict(parent) is True
    assert liveness.local_verdict(dead_owner()) is False
    host, pid, tag, boot, start, ns, machine = me.split(":")
    # another boot: a reboot, or a cloned VM with the same hostname and machine id: not for /proc to say
    assert liveness.local_verdict(f"{host}:{pid}:{tag}:000000000000:{start}:{ns}:{machine}") is None
    assert liveness.local_verdict(f"{host}:{pid}:{tag}:{boot}:1:{ns}:{machine}") is False  # pid reused
    assert liveness.local_verdict(f"{host}:{pid}:{tag}:{boot}:{start}:1:{machine}") is None  # another PID ns
    assert liveness.local_verdict(f"{host}:{pid}:{tag}:{boot}:{start}") is None  # a name from before issue 20
    assert liveness.local_verdict(f"{host}:{pid}:{tag}") is None


def test_postgresql_knows_a_dead_owner_of_any_host_by_its_session_lock(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    url = make_pg_database()
    prepare_db(url, 0)
    cfg = config_mod.load({"ETL_DATABASE_URL": url, "ANTHROPIC_API_KEY": "k"}, write_config(tmp_path))
    runtime = build(cfg, clock=lambda: T0)
    other = liveness.with_lock("another-host:4242:abcd1234:feedfeedfeed:99")
    assert liveness.local_verdict(other) is None  # nothing to read in /proc for another host
    holder = runtime.engine.connect()
    try:
        assert state.hold_owner_lock(holder, other)
        holder.commit()
        assert not recovery.owner_dead(
            runtime.db, runtime.owner, other, runtime.clock()
        )  # its session is alive
        assert not recovery.owner_dead(
            runtime.db, runtime.owner, other, runtime.clock()
        )  # asking does not take the lock away
    finally:
        holder.invalidate()  # the session ends (not back to the pool): the host died, the database dropped its lock
    assert recovery.owner_dead(runtime.db, runtime.owner, other, runtime.clock())
    runtime.close()


def test_a_dead_leaders_lease_is_taken_at_once_a_live_ones_is_not(rt: Harness) -> None:
    ttl = timedelta(seconds=120)
    with rt.engine.begin() as conn:
        assert state.acquire_lease(conn, state.LEADER_KEY, dead_owner(), T0, ttl)
    assert recovery.take_over_leader(rt.db, rt.owner, T0, ttl)
    with rt.engine.begin() as conn:
        assert state.lease_holder(conn, state.LEADER_KEY) == rt.owner
        state.release_lease(conn, state.LEADER_KEY, rt.owner)
        assert state.acquire_lease(conn, state.LEADER_KEY, liveness.new_owner(os.getppid()), T0, ttl)
    assert not recovery.take_over_leader(rt.db, rt.owner, T0, ttl)


def test_the_sweep_crashes_a_dead_owners_run_and_ends_its_claims_now(rt: Harness) -> None:
    gone = dead_owner()
    alive = liveness.new_owner(os.getppid())
    lease = T0 + timedelta(seconds=600)
    with rt.engine.begin() as conn:
        assert state.start_run(conn, "submit", T0.replace(second=0), "r-dead", gone, T0)
        assert state.start_run(conn, "collect", T0.replace(second=0), "r-live", alive, T0)
        mine = intents.create_intent(conn, gone, lease, T0)
        q.claim(conn, mine, 4, T0)
        theirs = intents.create_intent(conn, alive, lease, T0)
        q.claim(conn, theirs, 2, T0)
    found = recovery.sweep(rt.db, rt.owner, rt.clock())
    assert found.crashed_runs == ["r-dead"] and found.ended_leases == [mine]
    with rt.engine.connect() as conn:
        outcomes = dict(conn.execute(text("SELECT run_id, outcome FROM etl_runs")).all())
        assert outcomes == {"r-dead": "crashed", "r-live": "running"}
        assert intents.expired_claims(conn, T0) == [mine]  # the live owner's claim keeps its lease
    assert recovery.sweep(rt.db, rt.owner, rt.clock()).crashed_runs == []  # once


def test_slots_are_rerun_crashed_at_once_partial_with_backoff_until_the_cutoff(rt: Harness) -> None:
    slot = T0.replace(second=0)
    with rt.engine.begin() as conn:
        state.start_run(conn, "submit", slot, "a1", "h", T0)
        state.finish_run(conn, "a1", "crashed", "its process died", T0)
    assert recovery.due_reruns(rt.config.schedule, rt.db, T0, ("submit",)) == [
        recovery.Rerun("submit", slot, 2, "attempt 1 crashed")
    ]
    with rt.engine.begin() as conn:
        state.start_run(conn, "submit", slot, "a2", "h", T0, attempt=2)
        state.finish_run(conn, "a2", "partial", "3 document(s); stopped: rate limited: 429", T0)
    wait = recovery.backoff(rt.config.schedule, 2)
    assert wait == timedelta(seconds=10)
    assert recovery.due_reruns(rt.config.schedule, rt.db, T0 + wait / 2, ("submit",)) == []
    assert [r.attempt for r in recovery.due_reruns(rt.config.schedule, rt.db, T0 + wait, ("submit",))] == [3]
    assert [
        r.attempt for r in recovery.due_reruns(rt.config.schedule, rt.db, T0, ("submit",), rows_returned=True)
    ] == [3]
    six = datetime(2026, 6, 4, 6, 0, tzinfo=UTC)
    assert (
        recovery.due_reruns(rt.config.schedule, rt.db, six, ("submit",)) == []
    )  # the cut-off: reported, not retried
    with rt.engine.begin() as conn:
        state.start_run(conn, "submit", slot, "a3", "h", T0, attempt=3)
        state.finish_run(conn, "a3", "paused", "spend limit", T0)
    assert (
        recovery.due_reruns(rt.config.schedule, rt.db, T0 + timedelta(hours=1), ("submit",)) == []
    )  # needs a human


@settings(max_examples=200, deadline=None)
@given(
    slot=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)),
    hh=st.integers(0, 23),
    mm=st.integers(0, 59),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]),
)
def test_the_cutoff_is_the_next_retry_until_after_the_slot(
    slot: datetime, hh: int, mm: int, zone: str
) -> None:
    sch = config_mod.ScheduleSettings(timezone=zone, retry_until=f"{hh:02d}:{mm:02d}")
    at = recovery.cutoff(sch, slot)
    assert slot < at <= slot + timedelta(hours=26)
    local = at.astimezone(ZoneInfo(zone))
    assert (local.hour, local.minute) == (hh, mm) or local.fold or at - slot > timedelta(hours=22)


def test_a_silent_job_stops_the_watchdog_pings_and_any_commit_is_progress(rt: Harness) -> None:
    assert default_stall(rt.config) == 360.0  # the 300 s create call + a minute: shipped settings
    daemon = Daemon(
        rt.config, rt.db, rt.api, Notifier(None), env={STALL_ENV: "0.2"}, clock=rt.clock, me=rt.me
    )
    from sqlalchemy import event

    event.listen(rt.engine, "commit", daemon.watchdog.on_commit)
    daemon.watchdog.current = "submit"
    daemon.watchdog.progress_at = time.monotonic() - 1
    assert not daemon.watchdog.making_progress()  # hung on a socket: no ping, systemd kills after WatchdogSec

    def commit() -> None:
        with rt.engine.begin() as conn:
            conn.execute(text("SELECT 1"))

    commit()  # the main loop renewing the leader lease: not the job's progress
    assert not daemon.watchdog.making_progress()
    job = threading.Thread(target=commit)  # a commit on the job's thread is
    job.start()
    job.join()
    assert daemon.watchdog.making_progress()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    yield str(path), sock
    sock.close()


def test_sigstop_inside_the_submit_is_a_crash_the_watchdog_kills_and_the_restart_resumes(
    sqlite_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    notify_socket: tuple[str, socket.socket],
    control: EmulatorControl,
) -> None:
    """This test plays systemd with WatchdogSec=1 and WatchdogSignal=SIGKILL: no WATCHDOG=1 for a second
    and the process is killed, then started again at once (Restart=on-failure)."""
    prepare_db(sqlite_url, 8)
    path, sock = notify_socket
    offset = midnight_offset(control, timedelta(seconds=20))  # just after the nightly slot
    env = etl_env(
        sqlite_url,
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="1000000",
        ETL_CLOCK_OFFSET_SECONDS=str(offset),
        ETL_DAEMON_RUN_NOW="submit",
        ETL_FAILPOINTS="submit.after_fence=stop",
    )
    first = spawn(env, "run")
    ready = False  # systemd arms the watchdog once the service says READY=1
    last_ping = time.monotonic()
    watchdog_sec = 1.0
    while True:
        try:
            got = sock.recv(4096)
            ready = ready or b"READY=1" in got
            if b"WATCHDOG=1" in got or not ready:
                last_ping = time.monotonic()
        except TimeoutError:
            if not ready:
                last_ping = time.monotonic()
        if time.monotonic() - last_ping > watchdog_sec:
            break
        assert first.proc.poll() is None, first.output()[-2000:]
        assert time.monotonic() - last_ping < 30
    assert first.stopped_by_failpoint(), "the watchdog fired while the daemon was not stopped"
    first.proc.send_signal(signal.SIGKILL)  # WatchdogSignal=SIGKILL
    first.proc.wait(10)
    env.pop("ETL_FAILPOINTS")
    env.pop("ETL_DAEMON_RUN_NOW")
    second = spawn(env, "run")
    wait_for(
        lambda: query(sqlite_url, "SELECT count(*) FROM etl_queue WHERE status = 'submitted'")[0][0] == 8,
        timeout=60,
        what="the restarted daemon to send every document",
    )
    # the rows are committed `submitted` a moment before the run records its outcome
    wait_for(
        lambda: query(sqlite_url, "SELECT outcome FROM etl_runs ORDER BY attempt DESC")[0][0] != "running",
        timeout=60,
        what="the re-run to finish",
    )
    runs = query(sqlite_url, "SELECT attempt, outcome FROM etl_runs ORDER BY attempt")
    assert [tuple(r) for r in runs][:1] == [(1, "crashed")] and runs[-1][1] == "ok", runs
    assert second.terminate() == 0


def test_status_check_fails_on_a_crashed_slot_and_on_a_partial_submit_past_the_cutoff(rt: Harness) -> None:
    from etl import status

    slot = T0.replace(second=0)
    with rt.engine.begin() as conn:
        state.start_run(conn, "submit", slot, "a1", "h", T0)
        state.finish_run(conn, "a1", "crashed", "its process died (h)", T0)
    _, healthy, problems = status.status(rt.config, rt.db, rt.owner, rt.clock())
    assert not healthy and any("last submit run crashed" in p for p in problems), problems
    with rt.engine.begin() as conn:
        state.start_run(conn, "submit", slot, "a2", "h", T0 + timedelta(seconds=1), attempt=2)
        state.finish_run(conn, "a2", "partial", "stopped: rate limited: 429", T0)
    _, healthy, problems = status.status(rt.config, rt.db, rt.owner, rt.clock())
    assert healthy, problems  # retried during the night: not a problem yet
    late = datetime(2026, 6, 4, 6, 30, tzinfo=UTC)
    rt.clock = lambda: late
    _, healthy, problems = status.status(rt.config, rt.db, rt.owner, rt.clock())
    assert not healthy and any("schedule.retry_until 06:00" in p for p in problems), problems


def test_migration_0004_keeps_existing_runs_as_first_attempts(db_url: str) -> None:
    from alembic import command

    from etl.store import migrate
    from etl.store.engine import make_engine

    engine = make_engine(db_url)
    cfg = migrate._alembic_config(migrate.roles(engine, engine)[0][1])
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
        conn.execute(
            text(
                "INSERT INTO etl_runs (job, slot, run_id, host, started_at, outcome) "
                "VALUES ('submit', :s, 'old', 'h', :s, 'running')"
            ),
            {"s": T0},
        )
    migrate.upgrade(engine, engine)
    with engine.begin() as conn:
        assert state.latest_attempt(conn, "submit") is not None
        assert [tuple(r) for r in conn.execute(text("SELECT run_id, attempt FROM etl_runs"))] == [("old", 1)]
        assert state.start_run(conn, "submit", T0, "again", "h", T0, attempt=2)
        assert not state.start_run(conn, "submit", T0, "twice", "h", T0, attempt=2)
    engine.dispose()


def test_a_submit_stopped_by_a_429_is_retried_the_same_night_with_backoff(
    sqlite_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
) -> None:
    prepare_db(sqlite_url, 5)
    control.set_faults(rules=[{"endpoint": "create", "action": "status", "status": 429, "times": 2}])
    offset = midnight_offset(control, timedelta(seconds=20))
    env = etl_env(sqlite_url, ETL_CLOCK_OFFSET_SECONDS=str(offset), ETL_DAEMON_RUN_NOW="submit")
    p = spawn(env, "run")
    sql = "SELECT attempt, outcome FROM etl_runs WHERE job = 'submit' ORDER BY attempt"
    wait_for(lambda: (query(sqlite_url, sql) or [(0, "")])[-1][1] == "ok", timeout=60, what="the retries")
    runs = [tuple(r) for r in query(sqlite_url, sql)]
    assert runs == [(1, "partial"), (2, "partial"), (3, "ok")], runs  # 5 s, then 10 s later
    assert query(sqlite_url, "SELECT count(*) FROM etl_queue WHERE status = 'submitted'")[0][0] == 5
    assert control.ledger()["requests_created"] == 5
    assert p.terminate() == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    job=st.sampled_from(["submit", "collect"]),
    attempt=st.integers(1, 4),
    later=st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=30)),
)
def test_status_promises_a_rerun_of_a_crashed_run_exactly_when_the_daemon_would_make_one(
    rt: Harness, job: str, attempt: int, later: timedelta
) -> None:
    """`etl status` said "the daemon re-runs it" of a crashed submit past schedule.retry_until, which the
    daemon gives up (a test that ran after 06:00 UTC found it). The promise and the rule must agree."""
    slot = datetime(2026, 6, 4, tzinfo=UTC)
    sch = rt.config.schedule
    with rt.engine.begin() as conn:
        conn.execute(text("DELETE FROM etl_runs"))
        for n in range(1, attempt + 1):
            state.start_run(conn, job, slot, f"r{n}", "h", slot, attempt=n)
            state.finish_run(conn, f"r{n}", "crashed", "its process died", slot)
        runs = state.last_runs(conn)
    now = slot + later
    promised = "re-runs it" in " ".join(status.recovery_problems(sch, runs, now))
    # the first instants the daemon's rule could re-run it: now, or once the backoff is over
    instants = (now, max(now, slot + recovery.backoff(sch, attempt)))
    rerun = any(recovery.due_reruns(sch, rt.db, t, (job,)) for t in instants)
    assert promised == rerun, (now, status.recovery_problems(sch, runs, now))
