"""A whole night as the least-privilege roles (issue 24): real `etl` processes logged in as the daemon role,
documents from the producer role, results read by the reader role, on a real PostgreSQL."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from etl.emulator import EmulatorControl
from tests.conftest import run_etl, write_config
from tests.daemon.conftest import QUEUE_INSERT, EtlProcess, execute, nightly, query, wait_for
from tests.daemon.test_crash_recovery import midnight_offset
from tests.pg_roles import granted

NIGHTLY = 6


def test_a_whole_night_with_a_crash_runs_as_the_daemon_role(
    pg_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
    tmp_path: Path,
) -> None:
    with granted(pg_url) as g:
        execute(g.url("producer"), QUEUE_INSERT, nightly(NIGHTLY))
        daemon_url = g.url("daemon")
        cfg = str(write_config(tmp_path, **{"live.poll_seconds": 0.5}))
        # Just after the nightly slot, whatever the hour: the crashed submit is re-run only before
        # schedule.retry_until (06:00), so on the wall clock this test would fail every afternoon.
        at = str(midnight_offset(control, timedelta(minutes=5)))

        def env_of(**extra: str) -> dict[str, str]:
            return etl_env(daemon_url, config=cfg, ETL_CLOCK_OFFSET_SECONDS=at, **extra)

        def statuses() -> dict[str, str]:
            return dict(query(g.owner_url, "SELECT doc_key, status FROM etl_queue"))

        # Submit, killed right after the API accepted the batch and before its id was recorded.
        first = spawn(
            env_of(ETL_DAEMON_RUN_NOW="submit", ETL_FAILPOINTS="submit.after_create=kill"),
            "--log-json",
            "run",
        )
        assert first.proc.wait(60) == -signal.SIGKILL, first.output()
        # The restart adopts that batch (recovery, reconcile) and answers an urgent row live.
        second = spawn(env_of(), "--log-json", "run")
        wait_for(lambda: second.logged("live_worker_started"), 60, "the live worker to start")
        execute(
            g.url("producer"),
            "INSERT INTO etl_queue (doc_key, body, mode) VALUES ('urgent', 'now please', 'live')",
        )
        wait_for(lambda: statuses().get("urgent") == "done", 30, "the urgent row to be answered live")
        wait_for(
            lambda: sorted(set(statuses().values())) in (["done", "submitted"], ["done"]),
            30,
            "the crashed submit's batch to be adopted",
        )
        wait_for(
            lambda: (
                query(g.owner_url, "SELECT outcome FROM etl_runs WHERE job = 'submit' ORDER BY attempt DESC")[
                    0
                ][0]
                == "ok"
            ),
            30,
            "the crashed submit slot to be re-run",
        )
        assert second.terminate() == 0, second.output()
        # The morning: collect as the daemon role, until the batch has ended and is in.
        env = env_of()
        wait_for(
            lambda: run_etl(["collect"], env).returncode == 0 and set(statuses().values()) == {"done"},
            60,
            "the batch to be collected",
        )
        assert run_etl(["reconcile"], env).returncode == 0
        check = run_etl(["status", "--check"], env)
        assert check.returncode == 0, check.stdout + check.stderr
        for p in (first, second):
            assert "permission denied" not in p.output()
            assert "Traceback" not in p.output()
        assert control.ledger()["requests_created"] == NIGHTLY + 0  # the crash sent nothing twice
        # The reader sees every answer.
        reader = query(g.url("reader"), "SELECT doc_key, mode FROM etl_results ORDER BY doc_key")
        assert reader == [*((f"doc-{i}", "batch") for i in range(NIGHTLY)), ("urgent", "live")]
