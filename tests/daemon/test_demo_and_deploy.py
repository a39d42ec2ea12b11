"""`etl demo` end to end, and the deployment files' static checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import ROOT


def test_demo_runs_the_whole_cycle_quickly() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "etl.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "36 documents" in out
    assert "3 re-queued" in out and "2 dead-lettered" in out
    assert "Morning report" in out and "saved $" in out
    assert "dead: doc-017: invalid_request_error" in out
    assert "queue: dead 2, done 35" in out  # 34 by the batch, one urgent document live
    assert "urgent-001 answered live" in out and "the other 36 documents wait for the night" in out
    assert "live path:  1 documents" in out
    assert "etl run" in out and "ANTHROPIC_API_KEY" in out
    assert elapsed < 60


@pytest.mark.skipif(
    not shutil.which("systemd-analyze") and not os.environ.get("CI"), reason="systemd-analyze not installed"
)
def test_deploy_check_passes() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exposure: " in result.stdout
