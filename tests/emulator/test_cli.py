"""The ``etl emulator`` command: options, start-up line and clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anthropic

from etl.emulator.cli import build_parser, load_faults

ROOT = Path(__file__).resolve().parents[2]


def test_help_documents_every_option() -> None:
    text = build_parser().format_help()
    for option in (
        "--host",
        "--port",
        "--processing-seconds",
        "--max-request-bytes",
        "--state-file",
        "--faults",
        "--seed",
        "--api-key",
        "--log-level",
    ):
        assert option in text


def test_faults_option_takes_inline_json_or_a_file(tmp_path: Path) -> None:
    inline = '{"rules": [{"endpoint": "create", "action": "reset"}]}'
    path = tmp_path / "faults.json"
    path.write_text(inline)
    assert load_faults(inline) == load_faults(str(path))


def test_module_runs_prints_base_url_and_exits_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "etl.emulator", "--port", "0", "--processing-seconds", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        export = process.stdout.readline().strip()
        assert export.startswith("export ANTHROPIC_BASE_URL=http://127.0.0.1:")
        base_url = export.split("=", 1)[1]
        client = anthropic.Anthropic(base_url=base_url, api_key="anything", max_retries=0)
        assert client.messages.batches.list().data == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
