"""Issue 20, finding 2, played for real: two `etl run` daemons with one hostname, each PID 1 of a PID
namespace of its own (`unshare --pid --fork --mount-proc`, as two containers with host networking), on one
database; the leader's create stays in flight for 40 s (the emulator answers it after `delay_seconds`).

Before issue 20 the follower read the leader's pid (1) in its own /proc, found itself there with another
start time, declared the live leader dead, took the lease, marked its submit `crashed` and released its
in-flight create after 15 s: every document sent twice. Now the leader's proof of life (PostgreSQL: its
session advisory lock; SQLite: its flock beside the database file) is asked first and is held.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from etl.emulator import EmulatorControl
from tests.conftest import run_etl, write_config
from tests.daemon.conftest import EtlProcess, prepare_db, query, wait_for
from tests.ledger import by_row

IN_FLIGHT_SECONDS = 40.0  # the window: the leader's create is answered this long after it was sent
DOCS = 30
AFTER_CREATE = ("submitted", "ended", "collected")  # the leader's own startup poll may collect it at once

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


def daemon_in_own_pid_namespace(env: dict[str, str], tmp_path: Path, name: str) -> EtlProcess:
    """`etl run` as PID 1 of a new PID namespace (its own /proc); same hostname, network and files.
    `--kill-child`: killing the unshare process kills the daemon (and so its namespace)."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            sys.executable,
            "-m",
            "etl.cli",
            "run",
        ],
        env=env,
        cwd=tmp_path,
        stdout=out.open("wb"),
        stderr=err.open("wb"),
    )
    return EtlProcess(proc, out, err)


def leader_lease(url: str) -> str | None:
    rows = query(url, "SELECT holder FROM etl_state WHERE key = 'leader'")
    return rows[0][0] if rows else None


def check_nobody_declared_dead(url: str, leader: str, control: EmulatorControl, follower: EtlProcess) -> None:
    """What a follower that took the live leader for dead would have done, one of them at least."""
    runs = query(url, "SELECT job, outcome FROM etl_runs")
    assert all(outcome in ("running", "ok") for _, outcome in runs), runs  # no run marked crashed
    intents = query(url, "SELECT status, owner FROM etl_batches")
    assert len(intents) == 1, intents
    status, owner = intents[0]
    assert status in ("sending", *AFTER_CREATE), intents  # not unknown, released or failed
    assert status != "sending" or owner == leader, intents  # not taken over
    assert leader_lease(url) == leader  # the lease not taken
    assert control.ledger()["batches_created"] <= 1
    for event in ("leadership_acquired", "leader_taken_over", "run_crashed"):
        assert not follower.logged(event), follower.output()


def test_two_daemons_with_one_hostname_in_separate_pid_namespaces_never_bury_the_live_leader(
    tmp_path: Path, db_url: str, etl_env: Callable[..., dict[str, str]], control: EmulatorControl
) -> None:
    prepare_db(db_url, DOCS)
    cfg = write_config(
        tmp_path,
        **{
            "schedule.leader_lease_seconds": 3,  # the follower asks about the leader every second
            "submit.reconcile_grace_seconds": 10,  # a wrongly taken intent would be released inside the window
        },
    )
    env = etl_env(db_url, config=str(cfg))
    control.set_faults(
        rules=[{"endpoint": "create", "action": "ambiguous", "delay_seconds": IN_FLIGHT_SECONDS}]
    )
    a = daemon_in_own_pid_namespace({**env, "ETL_DAEMON_RUN_NOW": "submit"}, tmp_path, "leader")
    b = None
    try:
        wait_for(
            lambda: query(db_url, "SELECT 1 FROM etl_batches WHERE status = 'sending'"), 30, "A's create"
        )
        sent_at = time.monotonic()
        leader = leader_lease(db_url)
        assert leader is not None and leader.split(":")[1] == "1", leader  # PID 1 of its own namespace
        b = daemon_in_own_pid_namespace(env, tmp_path, "follower")  # its start-up sweep runs now, in flight
        wait_for(lambda: b.logged("standby") or b.logged("leadership_acquired"), 30, "B to decide")
        finished = "SELECT 1 FROM etl_runs WHERE job = 'submit' AND outcome <> 'running'"
        while not query(db_url, finished):  # the 40 s window: B watches A's create in flight
            check_nobody_declared_dead(db_url, leader, control, b)
            assert a.proc.poll() is None and b.proc.poll() is None, a.output() + b.output()
            assert time.monotonic() - sent_at < IN_FLIGHT_SECONDS + 30, "A's submit never finished"
            time.sleep(0.5)
        window = time.monotonic() - sent_at
        check_nobody_declared_dead(db_url, leader, control, b)
        assert window >= IN_FLIGHT_SECONDS - 2, window  # B really stood by through the in-flight window
        assert query(db_url, "SELECT outcome FROM etl_runs WHERE job = 'submit'") == [("ok",)]
        assert query(db_url, "SELECT status FROM etl_batches")[0][0] in AFTER_CREATE
    finally:
        for p in (a, b):
            if p is not None:
                p.kill()
    control.clear_faults()
    done = "SELECT count(*) FROM etl_queue WHERE status = 'done'"
    wait_for(lambda: run_etl(["collect"], env) and query(db_url, done)[0][0] == DOCS, 30, "collect")
    ledger = control.ledger()
    assert (ledger["batches_created"], ledger["requests_created"]) == (1, DOCS)
    billed = by_row(ledger)
    assert len(billed) == DOCS and [k for k, n in billed.items() if n > 1] == []  # 0 documents sent twice
    check = run_etl(["status", "--check"], env)
    assert check.returncode == 0, check.stdout + check.stderr
