"""A full disk (issue 21): SQLite on a small tmpfs, filled until a few KB are left. Every command says so in
one line with exit 74 (which the systemd unit restarts), never "cannot connect" or a traceback; `etl
status --check` fails while anything waits; once space is freed, the next run finishes the work with
nothing lost and nothing billed twice."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from etl import config as config_mod
from etl.emulator import EmulatorControl, EmulatorServer
from etl.store import migrate
from tests.conftest import API_KEY, SharedClock, insert_docs, queue_rows, run_etl
from tests.harness import Harness, build

DISK_MB = 80  # above etl.disk.LOW_DISK_BYTES, so a disk with room is healthy


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Take all the disk's free space but `leave` bytes."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    size = max(1, st.f_bavail * st.f_frsize - leave)
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def disk_env(
    small_disk: Path, emulator: EmulatorServer, clock: SharedClock, config_file: Callable[..., Path]
) -> Iterator[tuple[dict[str, str], Harness]]:
    env = {
        "ETL_DATABASE_URL": f"sqlite:///{small_disk / 'etl.db'}",
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "ETL_CONFIG": str(config_file(submit={"max_requests_per_batch": 20})),
    }
    cfg = config_mod.load(env, Path(env["ETL_CONFIG"]))
    rt = build(cfg, clock=clock)
    migrate.upgrade(rt.engine, rt.warehouse)
    yield env, rt
    rt.close()


def _one_line_about_the_disk(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 74, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "cannot connect" not in done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("etl: ")]
    assert len(said) == 1 and ("disk full" in said[0] or "disk I/O error" in said[0]), done.stderr


@pytest.mark.parametrize("leave_kb", [8, 256])
def test_collect_on_a_full_disk_says_so_and_finishes_once_space_is_freed(
    leave_kb: int,
    disk_env: tuple[dict[str, str], Harness],
    small_disk: Path,
    clock: SharedClock,
    control: EmulatorControl,
) -> None:
    env, rt = disk_env
    insert_docs(rt, [{"doc_key": f"d{i}", "body": "x" * 2000 + str(i)} for i in range(100)])
    sent = run_etl(["submit"], {**env, **clock.env})
    assert sent.returncode == 0, sent.stderr
    clock.advance(3600)
    filler = _fill(small_disk, leave_kb * 1024)
    for _ in range(2):  # and again: a second try on the same full disk says the same
        _one_line_about_the_disk(run_etl(["collect"], {**env, **clock.env}))
    check = run_etl(["status", "--check"], {**env, **clock.env})
    assert check.returncode != 0, check.stdout
    assert "Traceback" not in check.stderr
    filler.unlink()
    done = run_etl(["collect"], {**env, **clock.env})
    assert done.returncode == 0, done.stderr
    rows = queue_rows(rt)
    assert {r["status"] for r in rows.values()} == {"done"}, rows
    billed = control.ledger()["billed"]
    assert len(billed) == 100 and set(billed.values()) == {1}
    check = run_etl(["status", "--check"], {**env, **clock.env})
    assert check.returncode == 0, check.stdout


def test_submit_on_a_full_disk_says_so_and_sends_once_space_is_freed(
    disk_env: tuple[dict[str, str], Harness], small_disk: Path, clock: SharedClock, control: EmulatorControl
) -> None:
    env, rt = disk_env
    insert_docs(rt, [{"doc_key": f"d{i}", "body": "x" * 2000 + str(i)} for i in range(100)])
    filler = _fill(small_disk, 8 * 1024)
    _one_line_about_the_disk(run_etl(["submit"], {**env, **clock.env}))
    check = run_etl(["status", "--check"], {**env, **clock.env})
    assert check.returncode != 0 and "disk nearly full" in check.stdout + check.stderr, check.stdout
    filler.unlink()
    assert run_etl(["submit"], {**env, **clock.env}).returncode == 0
    clock.advance(3600)
    assert run_etl(["collect"], {**env, **clock.env}).returncode == 0
    assert {r["status"] for r in queue_rows(rt).values()} == {"done"}
    assert set(control.ledger()["billed"].values()) == {1}
