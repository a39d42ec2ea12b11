"""Start-up off the critical path: a command that does not call the API never loads the SDK.

`import anthropic` is 1-4 s of CPU (thousands of modules); an idle `etl submit` used to pay it every night
for a run that sent nothing and listed nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from etl.emulator import EmulatorControl, EmulatorServer
from tests.cli.test_cli import env_for
from tests.conftest import ROOT, run_etl

# Runs the command in this process, then says whether the SDK was imported, the exit code, and whether
# the modules loaded were moved out of the garbage collector's way (etl.memory.freeze_imports).
PROBE = (
    "import gc, sys\nfrom etl.cli import main\nrc = main(sys.argv[1:])\n"
    "print('SDK', 'anthropic' in sys.modules, rc, 'frozen', gc.get_freeze_count() > 0)\n"
)


def probe(args: list[str], env: dict[str, str]) -> tuple[bool, int, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
    full.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=full, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    last = proc.stdout.strip().splitlines()[-1]
    _, loaded, rc, _, _ = last.split()
    return loaded == "True", int(rc), proc.stdout + proc.stderr


def test_commands_that_call_no_api_do_not_load_the_sdk(
    db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    env = env_for(db_url, emulator, config_file())
    assert run_etl(["db", "upgrade"], env).returncode == 0
    for args in (["submit"], ["status", "--check"], ["config"], ["report", "--now"]):
        loaded, rc, out = probe(args, env)
        assert rc == 0, out
        assert not loaded, (args, out)
        assert "frozen False" in out, (args, out)


def test_submit_loads_the_sdk_when_there_is_something_to_send(
    db_url: str, emulator: EmulatorServer, control: EmulatorControl, config_file: Callable[..., Path]
) -> None:
    env = env_for(db_url, emulator, config_file())
    assert run_etl(["db", "upgrade"], env).returncode == 0
    loaded, rc, out = probe(["submit"], env)
    assert not loaded and "nothing is queued" in out
    docs = Path(env["ETL_CONFIG"]).with_suffix(".jsonl")
    docs.write_text('{"doc_key": "a", "body": "some text"}\n', encoding="utf-8")
    assert run_etl(["enqueue", str(docs)], env).returncode == 0
    loaded, rc, out = probe(["submit"], env)
    assert loaded and rc == 0 and "submitted 1 document(s) in 1 batch(es)" in out, out
    # with the SDK loaded, its ~200,000 objects leave the collector's full scans (one per batch)
    assert "frozen True" in out, out
    assert len(control.ledger()["billed"]) == 0  # created, not yet processed: nothing billed twice


def test_collect_with_nothing_open_does_not_load_the_sdk_and_with_a_batch_open_does(
    db_url: str, emulator: EmulatorServer, control: EmulatorControl, config_file: Callable[..., Path]
) -> None:
    """`etl collect` from cron every few minutes: with no batch open and no create to reconcile it asks the
    API nothing, so it never pays the SDK's import (3.4 s of CPU a run before)."""
    env = env_for(db_url, emulator, config_file())
    assert run_etl(["db", "upgrade"], env).returncode == 0
    loaded, rc, out = probe(["collect"], env)
    assert rc == 0 and not loaded, out
    docs = Path(env["ETL_CONFIG"]).with_suffix(".jsonl")
    docs.write_text('{"doc_key": "a", "body": "some text"}\n', encoding="utf-8")
    assert run_etl(["enqueue", str(docs)], env).returncode == 0
    assert run_etl(["submit"], env).returncode == 0
    loaded, rc, out = probe(["collect"], env)
    assert rc == 0 and loaded, out  # a batch is open: it is retrieved
    control.advance(86400)  # the emulator's batches end within a day
    loaded, rc, out = probe(["collect"], env)
    assert rc == 0 and loaded and "1 succeeded" in out, out
    loaded, rc, out = probe(["collect"], env)
    assert rc == 0 and not loaded, out  # collected: nothing open again
