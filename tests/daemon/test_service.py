"""`etl run` as a real process against the emulator: systemd notify, signals at safe boundaries, logs."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from etl.emulator import EmulatorControl
from etl.notify import Notifier
from tests.conftest import run_etl, write_config
from tests.daemon.conftest import KEY, EtlProcess, prepare_db, query, wait_for


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield str(path), sock
    sock.close()


def drain(sock: socket.socket, into: list[str]) -> list[str]:
    while True:
        try:
            into.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            return into


def runs(url: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in query(url, "SELECT job, outcome FROM etl_runs ORDER BY id")]


def statuses(url: str) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in query(url, "SELECT status, count(*) FROM etl_queue GROUP BY status")}


def test_notifier_speaks_to_abstract_sockets() -> None:
    name = f"etl-test-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(1)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"})
        assert notifier.watchdog_interval == 2.0
        assert notifier.ready("up")
        assert sock.recv(4096).decode().splitlines()[0] == "READY=1"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_notifier_is_silent_without_a_service_manager() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready("up") and not notifier.watchdog()


def test_watchdog_pid_of_another_process_disables_the_watchdog() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None


def test_daemon_notifies_ready_watchdog_and_stopping(
    sqlite_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    notify_socket: tuple[str, socket.socket],
) -> None:
    prepare_db(sqlite_url, 3)
    path, sock = notify_socket
    env = etl_env(sqlite_url, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    p = spawn(env, "run")
    seen: list[str] = []
    wait_for(lambda: "READY=1" in drain(sock, seen), what="READY=1")
    wait_for(lambda: drain(sock, seen).count("WATCHDOG=1") >= 2, what="two watchdog pings")
    assert any(line.startswith("STATUS=idle; next: submit") for line in seen), seen
    assert p.terminate() == 0
    drain(sock, seen)
    assert "STOPPING=1" in seen
    assert seen.index("READY=1") < seen.index("STOPPING=1")


def test_a_config_error_exits_78_so_systemd_does_not_restart(
    tmp_path: Path, sqlite_url: str, etl_env: Callable[..., dict[str, str]]
) -> None:
    bad = write_config(tmp_path, **{"schedule.submit_cron": "every night"})
    result = run_etl(["run"], etl_env(sqlite_url, config=str(bad)))
    assert result.returncode == 78
    assert "submit_cron" in result.stderr


def test_an_unmigrated_database_exits_78(sqlite_url: str, etl_env: Callable[..., dict[str, str]]) -> None:
    result = run_etl(["run"], etl_env(sqlite_url))
    assert result.returncode == 78
    assert "etl db upgrade" in result.stderr


def test_sigterm_during_submit_finishes_the_batch_and_loses_nothing(
    tmp_path: Path,
    sqlite_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
) -> None:
    prepare_db(sqlite_url, 20)
    cfg = write_config(tmp_path, **{"submit.max_requests_per_batch": 5})
    env = etl_env(
        sqlite_url, config=str(cfg), ETL_DAEMON_RUN_NOW="submit", ETL_FAILPOINTS="submit.after_claim=stop@2"
    )
    p = spawn(env, "run")
    wait_for(p.stopped_by_failpoint, what="the daemon to stop inside the second batch")
    assert p.terminate() == 0, p.output()
    # The batch in hand was sent, no further one was started, nothing is left claimed.
    assert statuses(sqlite_url) == {"submitted": 10, "queued": 10}
    assert control.ledger()["batches_created"] == 2
    assert runs(sqlite_url) == [("submit", "interrupted")]
    assert p.logged("daemon_stopped")
    # The rest goes out with the next submit.
    assert run_etl(["submit"], etl_env(sqlite_url, config=str(cfg))).returncode == 0
    assert statuses(sqlite_url) == {"submitted": 20}


def test_sigterm_during_collect_finishes_the_batch_and_loses_nothing(
    tmp_path: Path,
    sqlite_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
) -> None:
    prepare_db(sqlite_url, 15)
    cfg = write_config(tmp_path, **{"submit.max_requests_per_batch": 5})
    assert run_etl(["submit"], etl_env(sqlite_url, config=str(cfg))).returncode == 0
    control.advance(3600)
    env = etl_env(
        sqlite_url,
        config=str(cfg),
        ETL_CLOCK_OFFSET_SECONDS="3600",
        ETL_DAEMON_RUN_NOW="collect",
        ETL_FAILPOINTS="collect.after_retrieve=stop@2",
    )
    p = spawn(env, "run")
    wait_for(p.stopped_by_failpoint, what="the daemon to stop inside the second batch")
    assert p.terminate() == 0, p.output()
    assert statuses(sqlite_url) == {"done": 10, "submitted": 5}
    assert runs(sqlite_url)[-1] == ("collect", "interrupted")
    assert not p.logged("morning_report")  # the report waits for a complete collect
    result = run_etl(["collect"], etl_env(sqlite_url, config=str(cfg), ETL_CLOCK_OFFSET_SECONDS="3600"))
    assert result.returncode == 0, result.stderr
    assert statuses(sqlite_url) == {"done": 15}
    assert query(sqlite_url, "SELECT count(*) FROM etl_results")[0][0] == 15


def test_the_api_key_never_reaches_the_logs_even_at_debug_level(
    sqlite_url: str, etl_env: Callable[..., dict[str, str]], spawn: Callable[..., EtlProcess]
) -> None:
    prepare_db(sqlite_url, 4)
    env = etl_env(sqlite_url, ETL_DAEMON_RUN_NOW="submit,collect")
    p = spawn(env, "--log-level", "debug", "run")
    wait_for(lambda: len([r for r in runs(sqlite_url) if r[1] != "running"]) == 2, what="both jobs")
    assert p.terminate() == 0
    output = p.output()
    assert '"logger": "sqlalchemy' in output and "httpx2" in output, "not a debug-level run"
    assert '"run_id"' in output
    assert KEY not in output
    assert KEY[-12:] not in output


def test_job_events_carry_a_run_id(
    sqlite_url: str, etl_env: Callable[..., dict[str, str]], spawn: Callable[..., EtlProcess]
) -> None:
    prepare_db(sqlite_url, 2)
    p = spawn(etl_env(sqlite_url, ETL_DAEMON_RUN_NOW="submit"), "run")
    wait_for(lambda: runs(sqlite_url) == [("submit", "ok")], what="the submit run")
    assert p.terminate() == 0
    run_id = query(sqlite_url, "SELECT run_id FROM etl_runs")[0][0]
    events = [line for line in p.output().splitlines() if f'"run_id": "{run_id}"' in line]
    assert any('"event": "batch_submitted"' in e for e in events)
    assert all('"job": "submit"' in e for e in events)


def test_sighup_reloads_the_schedule_and_keeps_running_on_a_bad_file(
    tmp_path: Path,
    sqlite_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
) -> None:
    prepare_db(sqlite_url, 0)
    cfg = write_config(tmp_path)
    p = spawn(etl_env(sqlite_url, config=str(cfg)), "run")
    wait_for(lambda: p.logged("leadership_acquired"), what="start-up")
    started = next(json.loads(line) for line in p.output().splitlines() if '"daemon_started"' in line)
    assert {"submit", "collect"} <= set(started["next_runs"])  # when each job runs next
    assert all(datetime.fromisoformat(t) for t in started["next_runs"].values())
    write_config(tmp_path, **{"schedule.submit_cron": "30 1 * * *"})
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: p.logged("config_reloaded"), what="the reload")
    assert '"schedule_changed": true' in p.output()
    cfg.write_text("this is not toml [", encoding="utf-8")
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: p.logged("reload_failed"), what="the failed reload")
    assert p.proc.poll() is None
    assert p.terminate() == 0
