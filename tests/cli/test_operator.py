"""The operator's day through the real `etl` command: every error one line with its exit code, no
traceback, and the rows exactly where they were; `etl retry` and `etl cancel` on both databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from etl.emulator import EmulatorControl, EmulatorServer
from tests.cli.test_cli import env_for
from tests.conftest import ROOT, SharedClock, insert_docs, queue_rows, run_etl
from tests.harness import Harness
from tests.ledger import by_row


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The command failed with `code`, saying one line on stderr that contains every fragment."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("etl: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def batches(rt: Harness) -> list[dict[str, object]]:
    with rt.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT id, status, batch_id FROM etl_batches"))]


def jsonl(path: Path, rows: list[dict[str, object]], broken_at: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if broken_at is not None:
        lines.insert(broken_at - 1, '{"doc_key": "oops", "body": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- 1. a database that does not answer --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("postgresql://postgres:s3cret@127.0.0.1:1/etl", "Connection refused"),
        ("postgres://postgres:s3cret@127.0.0.1:5432/etl_no_such_db_i14", 'database "etl_no_such_db_i14"'),
        ("postgresql://postgres:s3cret@no-such-host.invalid:5432/etl", "no-such-host.invalid"),
    ],
    ids=["wrong-port", "unknown-database", "unknown-host"],
)
def test_an_unreachable_database_is_one_line_naming_the_masked_url_with_the_config_code(
    url: str, what: str, config_file: Callable[..., Path]
) -> None:
    env = {"ETL_CONFIG": str(config_file()), "ETL_DATABASE_URL": url}
    commands = [["status"], ["db", "upgrade"], ["submit"]] if "Connection refused" in what else [["status"]]
    for args in commands:
        proc = run_etl(args, {**env, "ANTHROPIC_API_KEY": "k"})
        err = one_line_error(proc, 78, "cannot connect to the database", url.replace("s3cret", "***"), what)
        assert "s3cret" not in err
        assert "check the host, port, database name and credentials" in err


def test_a_sqlite_file_in_a_folder_that_cannot_be_made_is_one_line(config_file: Callable[..., Path]) -> None:
    env = {"ETL_CONFIG": str(config_file()), "ETL_DATABASE_URL": "sqlite:////proc/no-such-dir/etl.db"}
    one_line_error(run_etl(["status"], env), 78, "sqlite:////proc/no-such-dir/etl.db")


# -- 2. an input file that does not exist ------------------------------------------------------------


def test_enqueue_of_a_missing_file_is_one_line_and_enqueues_nothing(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path], tmp_path: Path
) -> None:
    env = env_for(db_url, emulator, config_file())
    proc = run_etl(["enqueue", str(tmp_path / "no-such-file.jsonl")], env)
    one_line_error(proc, 66, "no-such-file.jsonl does not exist", "nothing was enqueued")
    assert queue_rows(runtime) == {}


# -- 3. no configuration file ------------------------------------------------------------------------


def _etl_elsewhere(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`etl` run from a folder with no config/etl.toml (run_etl runs from the project, which has one)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
    full.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "etl.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


@pytest.mark.skipif(Path("/etc/etl/etl.toml").exists(), reason="this machine has /etc/etl/etl.toml")
def test_no_config_file_anywhere_says_so_and_lists_where_it_looked(tmp_path: Path) -> None:
    proc = _etl_elsewhere(["status"], {}, tmp_path)
    err = one_line_error(
        proc, 78, "no configuration file found", "$ETL_CONFIG (not set)", "/etc/etl/etl.toml"
    )
    assert str(tmp_path / "config" / "etl.toml") in err
    assert "[tasks" not in err


def test_a_config_path_that_does_not_exist_says_only_that(tmp_path: Path) -> None:
    proc = _etl_elsewhere(["--config", "nope.toml", "status"], {}, tmp_path)
    err = one_line_error(proc, 78, "config file nope.toml (from --config) does not exist")
    assert "tasks" not in err
    proc = _etl_elsewhere(["status"], {"ETL_CONFIG": "/no/etl.toml"}, tmp_path)
    one_line_error(proc, 78, "config file /no/etl.toml (from ETL_CONFIG) does not exist")


# -- 4. postgres:// URLs -----------------------------------------------------------------------------


def test_postgres_scheme_alias_is_accepted(
    make_pg_database: Callable[[], str], emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    url = make_pg_database().replace("postgresql://", "postgres://", 1)
    env = env_for(url, emulator, config_file())
    for args in (["db", "upgrade"], ["status"]):
        proc = run_etl(args, env)
        assert proc.returncode == 0, proc.stderr


def test_an_unsupported_url_is_shown_whole_with_its_password_masked(config_file: Callable[..., Path]) -> None:
    env = {"ETL_CONFIG": str(config_file()), "ETL_DATABASE_URL": "mysql://etl:hunter2@db.example:3306/etl"}
    proc = run_etl(["status"], env)
    assert proc.returncode == 78 and "Traceback" not in proc.stderr
    assert "'mysql://etl:***@db.example:3306/etl' is neither sqlite:///PATH nor postgresql://" in proc.stderr
    assert "hunter2" not in proc.stderr
    assert proc.stderr.count("database url") == 1  # the warehouse (the same URL) is not reported twice


# -- 5. a broken line: the whole file or nothing ------------------------------------------------------


def test_a_broken_line_enqueues_nothing_and_the_fixed_file_goes_in_once(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path], tmp_path: Path
) -> None:
    env = env_for(db_url, emulator, config_file())
    rows: list[dict[str, object]] = [{"doc_key": f"k{i}", "body": f"document {i}"} for i in range(7)]
    path = jsonl(tmp_path / "docs.jsonl", rows, broken_at=6)
    # blocks of 2: before, the first blocks were committed before line 6 was read
    proc = run_etl(["enqueue", "--batch-rows", "2", str(path)], env)
    one_line_error(proc, 65, "line 6: not valid JSON", "nothing from the file was enqueued")
    assert queue_rows(runtime) == {}

    jsonl(path, rows)
    proc = run_etl(["enqueue", "--batch-rows", "2", str(path)], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("enqueued") == 1 and "enqueued 7 document(s)" in proc.stdout
    assert sorted(queue_rows(runtime)) == [f"k{i}" for i in range(7)]


# -- 6. a task that is not configured -----------------------------------------------------------------


def test_a_row_naming_an_unknown_task_is_refused_at_enqueue_with_the_configured_tasks(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path], tmp_path: Path
) -> None:
    env = env_for(db_url, emulator, config_file())
    rows: list[dict[str, object]] = [
        {"doc_key": "fine", "body": "x"},
        {"doc_key": "typo", "body": "y", "task": "translate"},
    ]
    proc = run_etl(["enqueue", str(jsonl(tmp_path / "t.jsonl", rows))], env)
    one_line_error(
        proc, 65, "line 2 (doc_key 'typo')", "task 'translate' is not configured", "classify, default"
    )
    assert queue_rows(runtime) == {}
    proc = run_etl(["enqueue", "--task", "nosuch", str(jsonl(tmp_path / "u.jsonl", rows[:1]))], env)
    one_line_error(proc, 65, "--task: task 'nosuch' is not configured (configured tasks: classify, default)")
    assert queue_rows(runtime) == {}


# -- 7. no API key: nothing claimed ---------------------------------------------------------------------


def test_submit_without_a_key_claims_nothing_and_the_next_run_sends_everything(
    runtime: Harness,
    db_url: str,
    emulator: EmulatorServer,
    control: EmulatorControl,
    config_file: Callable[..., Path],
) -> None:
    env = env_for(db_url, emulator, config_file())
    insert_docs(runtime, [{"doc_key": f"d{i}", "body": f"text {i}"} for i in range(3)])
    no_key = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}
    one_line_error(run_etl(["submit"], no_key), 78, "no Anthropic API key found", "ANTHROPIC_API_KEY")
    assert {r["status"] for r in queue_rows(runtime).values()} == {"queued"}
    assert batches(runtime) == []  # no intent, no lease to wait for

    proc = run_etl(["submit"], env)
    assert proc.returncode == 0 and "submitted 3 document(s) in 1 batch(es)" in proc.stdout, proc.stderr
    assert {r["status"] for r in queue_rows(runtime).values()} == {"submitted"}
    again = run_etl(["submit"], env)
    assert again.returncode == 0 and "submitted 0 document(s)" in again.stdout
    assert "(nothing is queued)" in again.stdout
    assert len(by_row(control.ledger())) == 0  # processing has not happened yet; nothing sent twice


def test_a_run_that_sends_nothing_says_rows_are_held_by_another_claim(
    runtime: Harness, db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    from etl.store import batches as intents
    from etl.store import queue as q

    insert_docs(runtime, [{"doc_key": "held", "body": "text"}])
    now = runtime.clock()
    with runtime.engine.begin() as conn:
        intent = intents.create_intent(conn, "someone-else", now.replace(year=now.year + 1), now)
        assert q.claim(conn, intent, 10, now) == 1
    proc = run_etl(["submit"], env_for(db_url, emulator, config_file()))
    assert proc.returncode == 0, proc.stderr
    assert "1 row(s) are claimed by another run until" in proc.stdout


# -- etl retry ---------------------------------------------------------------------------------------------


def test_retry_selects_dead_and_rejected_rows_and_dry_run_changes_nothing(
    runtime: Harness,
    db_url: str,
    emulator: EmulatorServer,
    control: EmulatorControl,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    cfg = config_file()
    insert_docs(
        runtime,
        [
            {"doc_key": "ok", "body": "fine"},
            {"doc_key": "bad-task", "body": "x", "task": "translate"},
            {"doc_key": "empty", "body": "   "},
            {"doc_key": "poison", "body": "y"},
        ],
    )
    ids = {k: v["id"] for k, v in queue_rows(runtime).items()}
    control.set_faults(
        outcomes=[
            {
                "custom_id": f"q{ids['poison']}(_.*)?",
                "outcome": "errored",
                "error_type": "invalid_request_error",
                "message": "bad: request",
            }
        ]
    )
    env = env_for(db_url, emulator, cfg, clock)
    assert run_etl(["submit"], env).returncode == 0
    clock.advance(3600)
    env = env_for(db_url, emulator, cfg, clock)
    assert run_etl(["collect", "--no-report"], env).returncode == 0
    before = queue_rows(runtime)
    assert [before[k]["status"] for k in ("ok", "bad-task", "empty", "poison")] == [
        "done",
        "rejected",
        "rejected",
        "dead",
    ]

    one_line_error(run_etl(["retry"], env), 65, "say which documents")
    one_line_error(run_etl(["retry", "--since", "yesterday-ish"], env), 2, "--since: 'yesterday-ish'")

    dry = run_etl(["retry", "--reason", "NOT EXIST", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert "would retry 1 document(s)" in dry.stdout and "bad-task" in dry.stdout
    assert queue_rows(runtime) == before

    none = run_etl(["retry", "--until", "2000-01-01"], env)
    assert none.returncode == 0 and "retried 0 document(s)" in none.stdout
    assert run_etl(["retry", "--dead", "--since", "2h", "empty"], env).stdout.count("retried 0") == 1

    proc = run_etl(["retry", "--dead", "--since", "2h"], env)
    assert proc.returncode == 0 and "retried 1 document(s)" in proc.stdout, proc.stderr
    after = queue_rows(runtime)
    assert (after["poison"]["status"], after["poison"]["attempts"]) == ("queued", 0)
    assert after["poison"]["reason"].startswith("retried; was dead: invalid_request_error: bad: request")
    assert after["bad-task"]["status"] == after["empty"]["status"] == "rejected"

    proc = run_etl(["retry", "--task", "default", "--rejected"], env)
    assert "retried 1 document(s)" in proc.stdout  # `empty`; `bad-task` is of task translate
    proc = run_etl(["retry", "bad-task"], env)
    assert "retried 1 document(s)" in proc.stdout
    assert {r["status"] for r in queue_rows(runtime).values()} == {"done", "queued"}


# -- etl cancel --------------------------------------------------------------------------------------------


def test_cancel_gives_unprocessed_requests_back_to_the_queue_without_an_attempt(
    runtime: Harness,
    db_url: str,
    emulator: EmulatorServer,
    control: EmulatorControl,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    cfg = config_file()
    insert_docs(runtime, [{"doc_key": f"c{i}", "body": f"text {i}"} for i in range(4)])
    env = env_for(db_url, emulator, cfg, clock)
    assert run_etl(["submit"], env).returncode == 0
    (batch,) = [b for b in batches(runtime) if b["batch_id"]]

    one_line_error(run_etl(["cancel"], env), 65, "BATCH_ID")
    one_line_error(run_etl(["cancel", "msgbatch_not_ours"], env), 65, "msgbatch_not_ours is not one")
    proc = run_etl(["cancel", str(batch["batch_id"])], env)
    assert proc.returncode == 0, proc.stderr
    assert f"canceled 1 batch(es): {batch['batch_id']}" in proc.stdout
    assert "still canceling" in proc.stdout

    clock.advance(5)  # the emulator ends a canceling batch within a virtual second
    env = env_for(db_url, emulator, cfg, clock)
    assert run_etl(["collect", "--no-report"], env).returncode == 0
    rows = queue_rows(runtime)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("queued", 0)}
    assert {r["reason"] for r in rows.values()} == {"canceled before the model processed it"}
    assert by_row(control.ledger()) == {}
    assert [b["status"] for b in batches(runtime) if b["batch_id"]] == ["collected"]
    proc = run_etl(["cancel", "--all-pending"], env)
    assert proc.returncode == 0 and "canceled no batch (none pending)" in proc.stdout

    # the same rows are sent again the next night and succeed
    assert "submitted 4 document(s)" in run_etl(["submit"], env).stdout
    clock.advance(3600)
    env = env_for(db_url, emulator, cfg, clock)
    assert run_etl(["collect", "--no-report"], env).returncode == 0
    assert {r["status"] for r in queue_rows(runtime).values()} == {"done"}


def test_cancel_all_pending_settles_a_batch_that_ended_at_once(
    runtime: Harness,
    db_url: str,
    emulator: EmulatorServer,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    cfg = config_file()
    insert_docs(runtime, [{"doc_key": f"e{i}", "body": f"text {i}"} for i in range(2)])
    assert run_etl(["submit"], env_for(db_url, emulator, cfg, clock)).returncode == 0
    clock.advance(3600)  # processed by now, not yet collected: the API answers the cancel with `ended`
    env = env_for(db_url, emulator, cfg, clock)
    proc = run_etl(["cancel", "--all-pending"], env)
    assert proc.returncode == 0, proc.stderr
    assert "settled now: 2 succeeded, 0 re-queued" in proc.stdout
    assert {r["status"] for r in queue_rows(runtime).values()} == {"done"}  # no collect needed


# -- the morning report on a terminal -------------------------------------------------------------------


def test_collect_on_a_terminal_prints_the_readable_report(
    runtime: Harness,
    db_url: str,
    emulator: EmulatorServer,
    clock: SharedClock,
    config_file: Callable[..., Path],
) -> None:
    import pty

    cfg = config_file()
    insert_docs(
        runtime, [{"doc_key": "a", "body": "text"}, {"doc_key": "b", "body": "x", "task": "translate"}]
    )
    assert run_etl(["submit"], env_for(db_url, emulator, cfg, clock)).returncode == 0
    clock.advance(3600)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
    full.update(env_for(db_url, emulator, cfg, clock))
    master, slave = pty.openpty()
    proc = subprocess.run(
        [sys.executable, "-m", "etl.cli", "--log-json", "collect"],
        env=full,
        stdout=slave,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    text_out = out.decode()
    assert proc.returncode == 0, proc.stderr
    assert "Morning report" in text_out and "documents per task" in text_out
    assert "task 'translate' does not exist (configured tasks: classify, default)" in text_out
    assert "released   a batch create whose outcome stayed unknown" in text_out
    # the log line says the report was made, without the whole report on one line
    (line,) = [json.loads(x) for x in proc.stderr.splitlines() if '"morning_report"' in x]
    assert "tasks" not in line and line["late"] == 0


def test_a_row_postgresql_refuses_is_one_line_and_the_file_is_rolled_back(
    make_pg_database: Callable[[], str],
    emulator: EmulatorServer,
    config_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    env = env_for(make_pg_database(), emulator, config_file())
    assert run_etl(["db", "upgrade"], env).returncode == 0
    rows: list[dict[str, object]] = [
        {"doc_key": "a", "body": "fine"},
        {"doc_key": "b", "body": "nul \u0000 here"},
    ]
    proc = run_etl(["enqueue", str(jsonl(tmp_path / "nul.jsonl", rows))], env)
    one_line_error(proc, 65, "the database refused a row", "nothing from the file was enqueued")
    status = json.loads(run_etl(["status", "--json"], env).stdout)
    assert sum(status["queue"].values()) == 0
