"""Database faults: every PostgreSQL connection of the test database is terminated while an `etl` process is
mid-run (stopped at a failpoint, then continued). The process recovers or exits non-zero with a message;
a rerun completes and every invariant holds."""

from __future__ import annotations

import signal
from collections.abc import Callable

import psycopg
import pytest

from tests.conftest import PG_ADMIN
from tests.reliability.harness import PROCESSING_SECONDS, Scenario


def _terminate_backends(url: str) -> int:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


POINTS = ["submit.after_claim", "submit.after_fence", "collect.after_retrieve", "collect.mid_stream"]


@pytest.mark.parametrize("point", POINTS)
def test_connections_terminated_mid_run_then_a_rerun_completes(
    point: str, make_scenario: Callable[..., Scenario]
) -> None:
    sc = make_scenario(f"db connections terminated at {point}", "postgresql")
    sc.insert_plain(12)
    command = ["submit"] if point.startswith("submit.") else ["collect", "--no-report"]
    if command[0] == "collect":
        assert sc.run("submit").returncode == 0
        sc.clock.advance(PROCESSING_SECONDS + 60)
    child = sc.spawn(*command, failpoints=f"{point}=stop")
    assert child.wait_stopped(), f"never reached {point}"
    killed = _terminate_backends(sc.url)
    child.signal(signal.SIGCONT)
    done = child.wait(120)
    sc.runs.append(done)
    sc.complete()
    outcome = "recovered" if done.returncode == 0 else f"exited {done.returncode}"
    sc.verdict(
        (killed >= 1, f"{killed} backend(s) terminated while stopped at {point}; the process {outcome}")
    )
