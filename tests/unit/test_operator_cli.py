"""What `etl --help` and the readable report promise, without a database."""

from __future__ import annotations

import argparse

import pytest

from etl import __version__, cli
from etl.report import KINDS, render

SUBCOMMANDS = [c for c in cli.COMMANDS if c != "db"] + ["demo"]


def _sub(name: str) -> argparse.ArgumentParser:
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = action.choices[name]
    return sub


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_help_says_what_it_does_its_exit_codes_and_environment(name: str) -> None:
    text = _sub(name).format_help()
    assert text.split("\n\n")[1].strip(), text  # a description
    assert "exit codes:" in text and "  0   success" in text
    if name != "demo":
        assert "environment:" in text and "ETL_DATABASE_URL" in text
    if name in ("submit", "collect", "cancel", "run"):
        assert "ANTHROPIC_API_KEY" in text


def test_version_and_one_spelling_of_log_levels(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"etl {__version__}"
    assert cli._parser().parse_args(["--log-level", "WARNING", "status"]).log_level == "warning"


def _report(tasks: dict[str, dict[str, int]], queue: dict[str, int]) -> dict[str, object]:
    return {
        "generated_at": "2026-12-02T07:00:00Z",
        "since": None,
        "tasks": tasks,
        "failures": {
            "rejected: task 'translate' does not exist (configured tasks: classify, default)": 2,
            "dead: invalid_request_error": 2,
        },
        "tokens_and_cost": {
            "input_tokens": 1,
            "output_tokens": 1,
            "cache_write_tokens": 0,
            "cache_read_tokens": 0,
            "cost_usd": 0.1,
            "standard_cost_usd": 0.2,
            "savings_usd": 0.1,
        },
        "pending_batches": [],
        "late": [],
        "queue": queue,
        "oldest_queued_age_hours": None,
        "submission_paused": None,
    }


def test_report_keeps_whole_reasons_explains_its_columns_and_keeps_a_stable_order() -> None:
    counts = {k: 1 for k in KINDS}
    live = _report({"zeta": counts, "alpha": counts}, {"queued": 1, "claimed": 0, "done": 5, "dead": 2})
    # as read back from PostgreSQL's JSONB: keys in another order
    stored = _report(
        {"alpha": dict(sorted(counts.items())), "zeta": counts},
        {"dead": 2, "done": 5, "claimed": 0, "queued": 1},
    )
    stored["failures"] = dict(reversed(list(live["failures"].items())))  # type: ignore[attr-defined]
    text = render(live)
    assert text == render(stored)
    assert "(configured tasks: classify, default)" in text
    assert text.index("alpha") < text.index("zeta")
    assert "queue now: queued 1, claimed 0, done 5, dead 2" in text
    for column in KINDS:
        assert f"  {column:<10} " in text  # every column is explained
