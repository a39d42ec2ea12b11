"""Several daemons on one PostgreSQL: one leader, each slot once, takeover when the leader dies; and
catch-up after downtime, decided from etl_runs with `now` passed in."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from etl import config as config_mod
from etl.daemon import Daemon
from etl.emulator import EmulatorControl
from etl.jobs import RunOutcome
from etl.notify import Notifier
from etl.store import state
from tests.conftest import write_config
from tests.daemon.conftest import EtlProcess, prepare_db, query, wait_for
from tests.harness import build


def test_two_daemons_on_one_database_run_each_slot_once_and_take_over(
    tmp_path: Path,
    pg_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
) -> None:
    prepare_db(pg_url, 12)
    cfg = write_config(tmp_path, **{"schedule.leader_lease_seconds": 3, "submit.max_requests_per_batch": 5})
    env = etl_env(pg_url, config=str(cfg), ETL_DAEMON_RUN_NOW="submit,collect")
    a, b = spawn(env, "run"), spawn(env, "run")
    done = "SELECT job, outcome, host FROM etl_runs WHERE outcome <> 'running' ORDER BY job"
    finished = wait_for(lambda: len(query(pg_url, done)) == 2 and query(pg_url, done), what="both jobs")
    assert [(job, outcome) for job, outcome, _ in finished] == [("collect", "ok"), ("submit", "ok")]
    assert len({host for _, _, host in finished}) == 1  # one leader ran both
    assert control.ledger()["requests_created"] == 12  # every document sent exactly once
    leader, follower = (a, b) if a.logged("job_started") else (b, a)
    wait_for(lambda: follower.logged("standby"), what="the follower to stand by")
    assert not follower.logged("job_started")

    leader.kill()  # SIGKILL: no lease release, the follower must wait for it to expire
    wait_for(lambda: follower.logged("leadership_acquired"), timeout=15, what="takeover")
    assert follower.terminate() == 0
    assert len(query(pg_url, "SELECT * FROM etl_runs")) == 2  # the new leader did not rerun the slots
    assert control.ledger()["requests_created"] == 12


def test_catch_up_after_downtime_runs_the_missed_slot_once(sqlite_url: str, tmp_path: Path) -> None:
    prepare_db(sqlite_url, 0)
    cfg = config_mod.load({"ETL_DATABASE_URL": sqlite_url, "ANTHROPIC_API_KEY": "k"}, write_config(tmp_path))
    now = [datetime(2025, 6, 4, 9, 30, tzinfo=UTC)]
    rt = build(cfg, clock=lambda: now[0])
    with rt.engine.begin() as conn:  # the daemon last ran both jobs on 1 June, then the machine was off
        state.start_run(conn, "submit", datetime(2025, 6, 1, tzinfo=UTC), "old-s", "h", now[0])
        state.start_run(conn, "collect", datetime(2025, 6, 1, 7, tzinfo=UTC), "old-c", "h", now[0])
    ran: list[tuple[str, datetime]] = []

    daemon = Daemon(rt.config, rt.db, rt.api, Notifier(None), env={}, clock=rt.clock, me=rt.me)

    def recording(job: str) -> tuple[RunOutcome, str]:
        ran.append((job, daemon.now()))
        return RunOutcome.OK, "recorded"

    daemon.jobs.body = recording  # type: ignore[method-assign]
    daemon.leader = True
    daemon._catch_up()
    daemon._catch_up()  # a second start-up the same morning finds nothing to do
    assert [job for job, _ in ran] == ["submit", "collect"]
    slots = query(sqlite_url, "SELECT job, slot FROM etl_runs WHERE run_id NOT LIKE 'old-%' ORDER BY slot")
    assert [(job, str(slot)[:16]) for job, slot in slots] == [
        ("submit", "2025-06-04 00:00"),
        ("collect", "2025-06-04 07:00"),
    ]
    now[0] += timedelta(days=1)
    daemon._catch_up()
    assert len(ran) == 4  # the next day's missed slots, once each
    rt.close()


def test_a_follower_does_not_run_jobs(sqlite_url: str, tmp_path: Path) -> None:
    prepare_db(sqlite_url, 0)
    cfg = config_mod.load({"ETL_DATABASE_URL": sqlite_url, "ANTHROPIC_API_KEY": "k"}, write_config(tmp_path))
    rt = build(cfg)
    daemon = Daemon(rt.config, rt.db, rt.api, Notifier(None), env={}, clock=rt.clock, me=rt.me)
    assert daemon.run_slot("submit", datetime(2025, 6, 4, tzinfo=UTC)) is None
    assert query(sqlite_url, "SELECT count(*) FROM etl_runs")[0][0] == 0
    rt.close()
