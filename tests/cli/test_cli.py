"""The real `etl` command in real processes: the user's view of the pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from etl.emulator import EmulatorControl, EmulatorServer
from etl.store import migrate
from tests.conftest import API_KEY, SharedClock, run_etl
from tests.ledger import by_row


def env_for(
    db_url: str, emulator: EmulatorServer, config: Path, clock: SharedClock | None = None
) -> dict[str, str]:
    env = {
        "ETL_CONFIG": str(config),
        "ETL_DATABASE_URL": db_url,
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
    }
    if clock is not None:
        env.update(clock.env)
    return env


def test_enqueue_submit_collect_status_report_through_the_cli(
    db_url: str,
    emulator: EmulatorServer,
    clock: SharedClock,
    control: EmulatorControl,
    config_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    cfg = config_file()
    env = env_for(db_url, emulator, cfg)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"doc_key": f"j{i}", "body": f"jsonl document {i}"}) for i in range(5))
        + "\n"
        + json.dumps({"doc_key": "c1", "body": "contract", "task": "classify", "title": "NDA"})
        + "\n",
        encoding="utf-8",
    )
    csv_file = tmp_path / "docs.csv"
    csv_file.write_text(
        "doc_key,body,priority\ncsv-1,first csv doc,5\ncsv-2,second csv doc,0\n", encoding="utf-8"
    )

    steps = [
        (["db", "upgrade"], f"-> {migrate.head_revision()}"),
        (["enqueue", str(jsonl)], "enqueued 6 document(s)"),
        (["enqueue", str(csv_file)], "enqueued 2 document(s)"),
        (["submit"], "submitted 8 document(s) in 1 batch(es); rejected 0"),
    ]
    for args, expected in steps:
        proc = run_etl(args, env)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout
    status = run_etl(["status", "--json"], env)
    info = json.loads(status.stdout)
    assert info["queue"]["submitted"] == 8 and len(info["pending_batches"]) == 1

    clock.advance(3600)
    env = env_for(db_url, emulator, cfg, clock)
    proc = run_etl(["collect"], env)
    assert proc.returncode == 0, proc.stderr
    assert "collected 1: 8 succeeded, 0 re-queued, 0 dead" in proc.stdout
    assert '"event": "morning_report"' in proc.stderr  # JSON log lines off a terminal

    report = run_etl(["report"], env)
    assert report.returncode == 0
    assert "Morning report" in report.stdout and "saved $" in report.stdout
    check = run_etl(["status", "--check"], env)
    assert check.returncode == 0, check.stdout
    assert sorted(by_row(control.ledger()).values()) == [1] * 8


def test_missing_api_key_is_one_line_saying_where_it_is_looked_for(
    db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    env = env_for(db_url, emulator, config_file())
    assert run_etl(["db", "upgrade"], env).returncode == 0
    del env["ANTHROPIC_API_KEY"]
    env["CREDENTIALS_DIRECTORY"] = "/run/credentials/etl.service"
    assert run_etl(["status"], env).returncode == 0  # needs no key
    proc = run_etl(["submit"], env)
    assert proc.returncode == 78
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert (
        proc.stderr.startswith("etl: configuration has 1 problem(s)") or "no Anthropic API key" in proc.stderr
    )
    assert "ANTHROPIC_API_KEY" in proc.stderr
    assert "/run/credentials/etl.service/anthropic_api_key" in proc.stderr


def test_bad_config_stops_with_every_problem_and_the_config_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "etl.toml"
    bad.write_text('[submit]\nmax_attempts = "three"\n[tasks.default]\nmax_tokens = 0\n', encoding="utf-8")
    proc = run_etl(["submit"], {"ETL_CONFIG": str(bad)})
    assert proc.returncode == 78
    assert "submit.max_attempts must be int" in proc.stderr
    assert "tasks.default.model is required" in proc.stderr
    assert "tasks.default.max_tokens must be a positive integer" in proc.stderr


def test_old_schema_refuses_to_run_and_names_the_command(
    db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path]
) -> None:
    proc = run_etl(["status"], env_for(db_url, emulator, config_file()))
    assert proc.returncode == 78
    assert "Run: etl db upgrade" in proc.stderr


def test_enqueue_reports_the_bad_line_of_a_file(
    db_url: str, emulator: EmulatorServer, config_file: Callable[..., Path], tmp_path: Path
) -> None:
    env = env_for(db_url, emulator, config_file())
    assert run_etl(["db", "upgrade"], env).returncode == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc_key": "a", "body": "fine"}\n{"doc_key": "b", "body": \n', encoding="utf-8")
    proc = run_etl(["enqueue", str(bad)], env)
    assert proc.returncode == 65
    assert "line 2: not valid JSON" in proc.stderr


def test_estimate_dry_run_and_a_months_report_through_the_cli(
    db_url: str,
    emulator: EmulatorServer,
    clock: SharedClock,
    control: EmulatorControl,
    config_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    env = env_for(db_url, emulator, config_file(submit={"max_cost_usd_per_night": 1.5}))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"doc_key": f"e{i}", "body": f"doc {i}"}) + "\n" for i in range(7)))
    for args in (["db", "upgrade"], ["enqueue", str(jsonl)]):
        assert run_etl(args, env).returncode == 0

    table = run_etl(["estimate"], env)
    assert table.returncode == 0, table.stderr
    assert "7 queued document(s) in 1 batch(es)" in table.stdout
    assert "nightly cap $1.5" in table.stdout and "7 of 7 document(s) fit under it" in table.stdout
    figures = json.loads(run_etl(["estimate", "--json", "--task", "default"], env).stdout)
    assert figures["documents"] == 7 and figures["tasks"][0]["max_output_tokens"] == 7 * 200
    dry = run_etl(["submit", "--dry-run", "--json"], env)
    assert json.loads(dry.stdout)["cost_usd"] == figures["cost_usd"]
    assert control.ledger()["batches_created"] == 0

    assert "submitted 7 document(s)" in run_etl(["submit"], env).stdout
    status = json.loads(run_etl(["status", "--json"], env).stdout)
    assert status["budget"]["caps_usd"] == {"*": "1.5000000000"}
    assert status["budget"]["reserved_usd"] == figures["upper_bound_usd"]
    month = run_etl(["report", "--since", "30d"], env)
    assert month.returncode == 0, month.stderr
    assert "budget for the night of" in month.stdout
    bad = run_etl(["report", "--since", "a month"], env)
    assert bad.returncode == 2 and "'a month' is not a time" in bad.stderr
