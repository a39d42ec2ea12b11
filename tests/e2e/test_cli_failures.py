"""A one-shot `etl submit` or `etl collect` that fails outside the daemon (by hand, from cron) is recorded
where `etl status --check` reads it (issue 21): the check fails naming the command, the time and the cause
the operator saw, until that command's next successful run. The real CLI in a real process, the failure
provoked by a failpoint that raises, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text

from etl.emulator import EmulatorServer
from etl.status import status
from etl.store import state
from tests.conftest import API_KEY, SharedClock, insert_docs, queue_rows, run_etl
from tests.harness import Harness


def _env(
    db_url: str, emulator: EmulatorServer, clock: SharedClock, config_file: Callable[..., Path]
) -> dict[str, str]:
    return {
        "ETL_DATABASE_URL": db_url,
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "ETL_CONFIG": str(config_file()),
        **clock.env,
    }


def _recorded(rt: Harness, command: str) -> list[str]:
    _, _, problems = status(rt.config, rt.db, rt.owner, rt.clock())
    return [p for p in problems if p.startswith(f"last etl {command} run by hand failed")]


def test_a_failed_etl_submit_fails_the_check_naming_its_cause_until_the_next_submit_succeeds(
    db_url: str,
    runtime: Harness,
    emulator: EmulatorServer,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    rt = runtime
    insert_docs(rt, [{"doc_key": f"s{i}", "body": f"document {i}"} for i in range(12)])
    env = _env(db_url, emulator, clock, config_file)
    failed = run_etl(["submit"], {**env, "ETL_FAILPOINTS": "submit.after_claim=raise"})
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    check = run_etl(["status", "--check"], env)
    assert check.returncode != 0, check.stdout
    [line] = _recorded(rt, "submit")
    cause = failed.stderr.strip().splitlines()[-1].removeprefix("etl: ")
    assert "submit.after_claim" in cause and cause in line, (cause, line)
    assert "last etl submit run by hand failed at " in check.stdout + check.stderr
    again = run_etl(["submit"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {r["status"] for r in queue_rows(rt).values()} == {"submitted"}
    assert _recorded(rt, "submit") == []
    check = run_etl(["status", "--check"], env)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_failed_etl_collect_fails_the_check_naming_its_cause_until_the_next_collect_succeeds(
    db_url: str,
    runtime: Harness,
    emulator: EmulatorServer,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    rt = runtime
    insert_docs(rt, [{"doc_key": f"c{i}", "body": f"document {i}"} for i in range(12)])
    env = _env(db_url, emulator, clock, config_file)
    assert run_etl(["submit"], env).returncode == 0
    clock.advance(120)
    env = _env(db_url, emulator, clock, config_file)
    failed = run_etl(
        ["collect", "--no-report"], {**env, "ETL_FAILPOINTS": "collect.before_mark_collected=raise"}
    )
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    [line] = _recorded(rt, "collect")
    assert "collect.before_mark_collected" in line, line
    check = run_etl(["status", "--check"], env)
    assert check.returncode != 0 and "last etl collect run by hand failed at " in check.stdout, check.stdout
    again = run_etl(["collect", "--no-report"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {r["status"] for r in queue_rows(rt).values()} == {"done"}
    assert _recorded(rt, "collect") == []
    check = run_etl(["status", "--check"], env)
    assert check.returncode == 0, check.stdout + check.stderr


REFUSE_SQLITE = """
CREATE TRIGGER refuse_{op} BEFORE {op} ON etl_state WHEN NEW.key LIKE 'cli_failure:%'
BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END
"""
REFUSE_PG = [
    """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END $$""",
    """CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON etl_state FOR EACH ROW
    WHEN (NEW.key LIKE 'cli_failure:%') EXECUTE FUNCTION refuse()""",
]


def test_a_failure_that_cannot_be_recorded_is_said_as_before(
    db_url: str,
    runtime: Harness,
    emulator: EmulatorServer,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    """The record cannot be written (a trigger refuses it with the disk-full error, as a full disk refuses
    every write): the failure is still one line with its own exit code, no traceback, no second error."""
    rt = runtime
    insert_docs(rt, [{"doc_key": "x", "body": "document"}])
    with rt.engine.begin() as conn:
        sql = (
            REFUSE_PG
            if rt.engine.dialect.name == "postgresql"
            else [REFUSE_SQLITE.format(op=op) for op in ("INSERT", "UPDATE")]
        )
        for statement in sql:
            conn.execute(text(statement))
    env = _env(db_url, emulator, clock, config_file)
    failed = run_etl(["submit"], {**env, "ETL_FAILPOINTS": "submit.after_claim=raise"})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    said = [line for line in failed.stderr.splitlines() if line.startswith("etl: ")]
    assert len(said) == 1 and "submit.after_claim" in said[0], failed.stderr
    assert "Traceback" not in failed.stderr and '"level": "error"' not in failed.stderr, failed.stderr
    assert _recorded(rt, "submit") == []


def test_a_submit_that_stopped_fails_the_check_with_its_reason_until_the_next_submit_succeeds(
    db_url: str,
    runtime: Harness,
    emulator: EmulatorServer,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    """Stopped, not crashed: creates are held after a 429 with `retry-after` (exit 3, "stopped: ...")."""
    rt = runtime
    insert_docs(rt, [{"doc_key": f"h{i}", "body": f"document {i}"} for i in range(5)])
    with rt.engine.begin() as conn:
        state.hold_creates(conn, clock() + timedelta(minutes=30), clock())
    stopped = run_etl(["submit"], _env(db_url, emulator, clock, config_file))
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    [line] = _recorded(rt, "submit")
    assert "stopped: rate limited" in line, line
    clock.advance(31 * 60)
    again = run_etl(["submit"], _env(db_url, emulator, clock, config_file))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _recorded(rt, "submit") == []
