"""Issue 22's rough edges, each as a new user met it, through the real `etl` command in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from etl.emulator import EmulatorConfig, EmulatorControl, EmulatorServer
from tests.cli.test_cli import env_for
from tests.conftest import API_KEY, ROOT, insert_docs, queue_rows, run_etl
from tests.harness import Harness


@pytest.fixture
def keyed_emulator() -> Iterator[EmulatorServer]:
    """An emulator that accepts only the tests' key, as the real API does."""
    server = EmulatorServer(
        EmulatorConfig(port=0, processing_seconds=60.0, seed=7, require_key=API_KEY)
    ).start()
    yield server
    server.stop()


def pause_reason(rt: Harness) -> str | None:
    with rt.engine.connect() as conn:
        return conn.execute(
            text("SELECT value FROM etl_state WHERE key = 'submission_paused'")
        ).scalar_one_or_none()


# -- 4. a wrong key: one behaviour, queued rows or not -----------------------------------------------


@pytest.mark.parametrize("queued", [0, 3], ids=["empty-queue", "rows-queued"])
def test_a_wrong_key_pauses_and_exits_75_at_the_first_command_that_asks_the_api(
    queued: int,
    runtime: Harness,
    db_url: str,
    keyed_emulator: EmulatorServer,
    config_file: Callable[..., Path],
) -> None:
    """One behaviour: the first command that calls the API with a wrong key pauses submission and exits
    75 in one line, and so does every later one that calls it. A submit on an empty queue and a collect
    with no batch open call no API (issue 23: they do not even load the SDK), so they learn nothing about
    the key: they exit 0 and pause nothing; `etl reconcile` always lists the API's batches."""
    insert_docs(
        runtime, [{"doc_key": f"d{i}", "body": f"document {i}", "task": "default"} for i in range(queued)]
    )
    env = {**env_for(db_url, keyed_emulator, config_file()), "ANTHROPIC_API_KEY": "sk-ant-wrong"}
    if queued:
        first = run_etl(["submit"], env)
    else:
        for command in (["submit"], ["collect", "--no-report"]):
            idle = run_etl(command, env)
            assert idle.returncode == 0 and pause_reason(runtime) is None, (idle.stdout, idle.stderr)
        first = run_etl(["reconcile"], env)
    assert first.returncode == 75, (first.returncode, first.stdout, first.stderr)
    assert "Traceback" not in first.stderr
    lines = [line for line in first.stderr.splitlines() if line.startswith("etl: ")]
    assert len(lines) == 1 and "401" in lines[0] and "etl resume" in lines[0], first.stderr
    assert pause_reason(runtime) is not None
    # Nothing was sent, and every row is back in the queue with its attempts untouched.
    assert EmulatorControl(keyed_emulator.base_url).ledger().get("batches_created", 0) == 0
    assert all(r["status"] == "queued" and r["attempts"] == 0 for r in queue_rows(runtime).values())
    # Paused: every later submit and reconcile says so with the same code; a collect with nothing open
    # asks the API nothing (the pause is still named by `etl status --check`).
    assert run_etl(["submit"], env).returncode == 75
    assert run_etl(["reconcile"], env).returncode == 75
    assert run_etl(["collect", "--no-report"], env).returncode == 0
    assert run_etl(["status", "--check"], env).returncode == 1


def intents(rt: Harness) -> list[str]:
    with rt.engine.connect() as conn:
        return list(conn.execute(text("SELECT status FROM etl_batches")).scalars())


# -- 2. a base URL that cannot work: said at start, or as a configuration error on the first 404 -------


def test_a_base_url_without_scheme_is_a_config_error_before_anything_is_claimed(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    insert_docs(runtime, [{"doc_key": "a", "body": "text", "task": "default"}])
    bare = emulator.base_url.removeprefix("http://")
    env = {**env_for(db_url, emulator, config_file()), "ANTHROPIC_BASE_URL": bare}
    for args in (["submit"], ["status"]):
        proc = run_etl(args, env)
        assert proc.returncode == 78 and "Traceback" not in proc.stderr, proc.stderr
        assert f"ANTHROPIC_BASE_URL '{bare}' is not an http:// or https:// URL" in proc.stderr
    proc = run_etl(["submit"], {**env, "ANTHROPIC_BASE_URL": emulator.base_url + "/v1"})
    assert proc.returncode == 78 and f"drop it: {emulator.base_url}" in proc.stderr, proc.stderr
    assert intents(runtime) == [] and queue_rows(runtime)["a"]["status"] == "queued"


def test_a_404_on_create_is_a_configuration_error_not_a_rate_limit(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    insert_docs(runtime, [{"doc_key": "a", "body": "text", "task": "default"}])
    env = {**env_for(db_url, emulator, config_file()), "ANTHROPIC_BASE_URL": emulator.base_url + "/gateway"}
    proc = run_etl(["submit"], env)
    assert proc.returncode == 78, (proc.returncode, proc.stdout, proc.stderr)
    assert "rate limited" not in proc.stdout + proc.stderr
    assert "HTTP 404" in proc.stderr and "base URL" in proc.stderr and "Traceback" not in proc.stderr
    # Nothing waits for a reconciler: the create never happened, the row is queued again, attempts untouched.
    assert "unknown" not in intents(runtime)
    row = queue_rows(runtime)["a"]
    assert row["status"] == "queued" and row["attempts"] == 0


# -- 1. a reader that goes away (`etl report | head -1`) ----------------------------------------------


def test_a_reader_that_leaves_early_gets_no_traceback(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    """The pipe's reader is gone before the command prints (as `head -1` is, most of the time): the
    command stops quietly with SIGPIPE's shell code, as `git log | head` does."""
    insert_docs(runtime, [{"doc_key": f"d{i}", "body": f"document {i}", "task": "default"} for i in range(3)])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}}
    env.update(env_for(db_url, emulator, config_file()))
    for args in (["report", "--now"], ["report", "--now", "--json"], ["estimate"], ["status", "--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl.cli", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.close()  # the reader leaves before a byte is written
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 141, (args, proc.returncode, err)
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


# -- 5. one time syntax, one exit code for a bad value, global options after the command --------------


def test_every_time_option_takes_the_same_syntax_and_refuses_the_same_way(
    tmp_path: Path, config_file: Callable[..., Path]
) -> None:
    env = {"ETL_DATABASE_URL": f"sqlite:///{tmp_path / 'etl.db'}", "ANTHROPIC_API_KEY": API_KEY}
    cfg = str(config_file())
    assert run_etl(["db", "upgrade", "--config", cfg], env).returncode == 0  # --config after the command
    selectors = {
        "report": (["report", "--since"], []),
        "estimate": (["estimate", "--older-than"], []),
        "retry --since": (["retry", "--dry-run", "--since"], []),
        "retry --until": (["retry", "--dry-run", "--until"], []),
    }
    for name, (args, tail) in selectors.items():
        for good in ("1w", "36h", "2026-11-01", "2026-11-01T06:00:00+01:00"):
            proc = run_etl(["--config", cfg, *args, good, *tail], env)
            assert proc.returncode == 0, (name, good, proc.stderr)
        bad = run_etl([*args, "last tuesday", "--config", cfg], env)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, (name, bad.stderr)
        assert bad.stderr.count("\n") == 1 and "'last tuesday' is not a time" in bad.stderr, (
            name,
            bad.stderr,
        )
    # --json before or after the command; refused, on one line, by a command that prints no reading.
    after = json.loads(run_etl(["status", "--json", "--config", cfg], env).stdout)
    before = json.loads(run_etl(["--json", "--config", cfg, "status"], env).stdout)
    assert after.keys() == before.keys() and "queue" in after
    refused = run_etl(["--json", "--config", cfg, "resume"], env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "no --json" in refused.stderr


# -- 8. the missing commands and the small lies -------------------------------------------------------


def test_pause_cancel_dry_run_canceling_and_retry_of_an_unconfigured_task(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    from etl import pipeline

    env = env_for(db_url, emulator, config_file())
    control = EmulatorControl(emulator.base_url)
    insert_docs(runtime, [{"doc_key": "a", "body": "text", "task": "default"}])
    insert_docs(runtime, [{"doc_key": "x", "body": "b", "task": "gone"}])
    with runtime.engine.begin() as conn:  # rows are inserted queued only; the submit would reject it so
        conn.execute(text("UPDATE etl_queue SET status = 'rejected', reason = 'no task' WHERE doc_key = 'x'"))
    (batch_id,) = pipeline.submit(
        runtime.config, runtime.db, runtime.api, runtime.me, runtime.clock, runtime.should_stop
    ).batch_ids

    dry = run_etl(["cancel", "--all-pending", "--dry-run", "--json"], env)
    assert dry.returncode == 0 and json.loads(dry.stdout) == [{"batch_id": batch_id, "requests": 1}], (
        dry.stderr
    )
    assert control.ledger()["batches_created"] == 1
    assert run_etl(["cancel", batch_id], env).returncode == 0
    pending = json.loads(run_etl(["status", "--json"], env).stdout)["pending_batches"]
    assert [(b["batch_id"], b["status"]) for b in pending] == [(batch_id, "canceling")]

    retried = run_etl(["retry", "x"], env)
    assert retried.returncode == 0 and "retried 1 document(s)" in retried.stdout
    assert "task 'gone', which is not configured" in retried.stderr and "[tasks.gone]" in retried.stderr

    assert run_etl(["pause", "maintenance window"], env).returncode == 0
    assert pause_reason(runtime) == "maintenance window"
    assert run_etl(["submit"], env).returncode == 75
    assert "was paused: maintenance window" in run_etl(["resume"], env).stdout
    assert pause_reason(runtime) is None

    current = json.loads(run_etl(["db", "current", "--json"], env).stdout)
    history = json.loads(run_etl(["db", "history", "--json"], env).stdout)
    assert set(current["databases"].values()) == {current["needed"]}
    assert history["migrations"][-1]["revision"] in {m["revision"] for m in history["migrations"]}


def test_status_on_a_sqlite_file_that_does_not_exist_creates_nothing(
    tmp_path: Path, config_file: Callable[..., Path]
) -> None:
    missing = tmp_path / "typo" / "etl.db"
    env = {"ETL_CONFIG": str(config_file()), "ETL_DATABASE_URL": f"sqlite:///{missing}"}
    for args in (["status"], ["report"], ["db", "current"]):
        proc = run_etl(args, env)
        assert proc.returncode == 78 and f"the file {missing} does not exist" in proc.stderr, proc.stderr
    assert not missing.parent.exists()
    assert run_etl(["db", "upgrade"], env).returncode == 0 and missing.exists()
