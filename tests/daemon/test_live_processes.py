"""The live path in real processes: `etl run` answering an urgent INSERT, SIGKILL mid-call, two workers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from etl.emulator import EmulatorControl
from tests.conftest import run_etl, write_config
from tests.daemon.conftest import EtlProcess, execute, prepare_db, query, wait_for

URGENT = "INSERT INTO etl_queue (doc_key, body, mode) VALUES (:k, :b, 'live')"


def insert_urgent(url: str, n: int, prefix: str = "urgent") -> None:
    execute(url, URGENT, [{"k": f"{prefix}-{i}", "b": f"{prefix} document {i}"} for i in range(n)])


def statuses(url: str) -> dict[str, str]:
    return {k: s for k, s in query(url, "SELECT doc_key, status FROM etl_queue")}


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


def test_the_daemon_answers_an_urgent_insert_live_while_the_rest_waits_for_the_night(
    any_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
    tmp_path: Path,
) -> None:
    prepare_db(any_url, 5)
    env = etl_env(any_url, config=write_config(tmp_path, **{"live.poll_seconds": 0.5}), ETL_LOG_JSON="1")
    daemon = spawn(env, "--log-json", "run")
    wait_for(lambda: daemon.logged("live_worker_started"), 60, "the live worker to start")
    insert_urgent(any_url, 1)
    wait_for(lambda: statuses(any_url).get("urgent-0") == "done", 30, "the urgent row to be answered")
    assert query(any_url, "SELECT mode FROM etl_results WHERE doc_key = 'urgent-0'") == [("live",)]
    assert sorted(set(statuses(any_url).values())) == ["done", "queued"]  # the nightly rows wait
    assert control.ledger()["batches_created"] == 0
    assert daemon.terminate() == 0


def test_sigkill_mid_call_leaves_every_row_valid_and_the_double_bills_equal_the_report(
    any_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
    tmp_path: Path,
) -> None:
    """The API bills a call when it receives it; the worker dies while waiting for the answers. Every row
    is then `calling` (valid: nothing is lost), and after the lease another worker calls each once more.
    The emulator's ledger shows exactly those documents billed twice, and the report says so."""
    prepare_db(any_url, 3)
    insert_urgent(any_url, 4)
    config = write_config(tmp_path, **{"live.concurrency": 4, "live.claim_lease_seconds": 60})
    env = etl_env(any_url, config=config)
    control.set_live(latency_seconds=60)
    worker = spawn(env, "live")
    wait_for(lambda: control.ledger()["live"]["calls"] == 4, 60, "four calls in flight")
    worker.kill()

    rows = query(any_url, "SELECT doc_key, status, call_started_at IS NOT NULL, live_calls FROM etl_queue")
    urgent = {k: (s, flying, calls) for k, s, flying, calls in rows if k.startswith("urgent")}
    assert set(urgent.values()) == {("calling", True, 1)}
    assert {s for k, s, *_ in rows if not k.startswith("urgent")} == {"queued"}

    control.set_live()  # answers at once from now on
    control.advance(61)  # past the lease, on both clocks
    later = {**env, "ETL_CLOCK_OFFSET_SECONDS": "61"}
    out = run_etl(["live", "--once"], later)
    assert out.returncode == 0, out.stderr
    assert "4 recovered after a crash (4 possibly billed twice)" in out.stdout

    final = statuses(any_url)
    assert {final[f"urgent-{i}"] for i in range(4)} == {"done"}
    billed = control.ledger()["live"]["billed"]
    double = sum(1 for n in billed.values() if n == 2)
    assert double == 4 and max(billed.values()) == 2  # at most one repeat per crash per document
    report = json.loads(run_etl(["report", "--now", "--json"], later).stdout)
    assert report["paths"]["live"]["possibly_billed_twice"] == double
    assert report["paths"]["live"]["documents"] == 4


def test_two_live_workers_on_one_postgresql_never_call_for_a_row_twice(
    pg_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
    tmp_path: Path,
) -> None:
    prepare_db(pg_url, 0)
    env = etl_env(
        pg_url,
        config=write_config(tmp_path, **{"live.concurrency": 4, "live.requests_per_minute": 600}),
        ETL_LOG_JSON="1",
    )
    control.set_live(latency_seconds=0.05)
    workers = [spawn(env, "--log-json", "live") for _ in range(2)]
    for w in workers:
        wait_for(lambda w=w: w.logged("live_worker_started"), 60, "both workers to start")
    for batch in range(4):
        insert_urgent(pg_url, 15, prefix=f"b{batch}")
    wait_for(lambda: set(statuses(pg_url).values()) == {"done"}, 60, "every urgent row answered")
    for w in workers:
        assert w.terminate() == 0
    ledger = control.ledger()["live"]
    assert ledger["calls"] == 60 and set(ledger["billed"].values()) == {1}
    assert query(pg_url, "SELECT count(*), sum(live_calls) FROM etl_queue") == [(60, 60)]
    claimed_by = [w.output().count('"event": "live_claimed"') for w in workers]
    assert sum(claimed_by) == 60
