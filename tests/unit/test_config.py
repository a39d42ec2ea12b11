"""Configuration: every problem listed at once, secrets never shown, the shipped file works."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl import config
from etl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_on_sqlite_with_no_environment() -> None:
    cfg = config.load({}, ROOT / "config" / "etl.toml")
    assert cfg.database_url == f"sqlite:///{ROOT / 'var' / 'etl.db'}"
    assert cfg.warehouse_url == cfg.database_url
    assert set(cfg.tasks) == {"default", "classify"}
    assert cfg.tasks["classify"].metadata_fields == ("title",)
    assert cfg.tasks["default"].cache_system is True


def test_environment_overrides_the_file() -> None:
    env = {
        "ETL_DATABASE_URL": "postgresql://etl@db/etl",
        "ETL_WAREHOUSE_URL": "postgresql://etl@dw/wh",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8765",
        "ANTHROPIC_API_KEY": "sk-ant-secret-value-123456",
        "ETL_TIMEZONE": "Europe/Berlin",
    }
    cfg = config.load(env, ROOT / "config" / "etl.toml")
    assert (cfg.database_url, cfg.warehouse_url) == ("postgresql://etl@db/etl", "postgresql://etl@dw/wh")
    assert cfg.separate_warehouse
    assert cfg.base_url == "http://127.0.0.1:8765"
    assert cfg.schedule.timezone == "Europe/Berlin"
    assert cfg.require_api_key() == "sk-ant-secret-value-123456"
    assert "sk-ant-secret" not in repr(cfg)
    # the file it came from, which a SIGHUP reads again (the base URL check once overwrote it)
    assert cfg.source == str(ROOT / "config" / "etl.toml")


def test_bad_config_lists_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "etl.toml"
    path.write_text(
        """
[database]
url = "mysql://nope"
[submit]
max_requests_per_batch = 200000
max_attempts = 0
colour = "blue"
[schedule]
timezone = "Mars/Olympus"
submit_cron = "every night"
[tasks.default]
template = "{body} {0}"
max_tokens = -1
[tasks.other]
model = "claude-unknown-9"
""",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        config.load({}, path)
    problems = err.value.problems
    expected = [
        "'mysql://nope' is neither sqlite:///PATH nor postgresql://",
        "submit.max_requests_per_batch is 200000; the API allows 100000",
        "submit.max_attempts must be positive",
        "unknown setting submit.colour",
        "schedule.timezone 'Mars/Olympus' is not a known IANA time zone",
        "schedule.submit_cron 'every night' is not a 5-field cron expression",
        "tasks.default.model is required",
        "tasks.default.template field {0} must be a plain name",
        "tasks.default.max_tokens must be a positive integer",
        "task 'other': no price configured for model 'claude-unknown-9'",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) >= len(expected)
    assert str(err.value).startswith(f"configuration has {len(problems)} problem(s):")


def test_invalid_toml_and_missing_file_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[database\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load({}, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load({"ETL_CONFIG": str(tmp_path / "missing.toml")})


def test_missing_api_key_says_where_it_is_looked_for(tmp_path: Path) -> None:
    cfg = config.load({"CREDENTIALS_DIRECTORY": str(tmp_path)}, ROOT / "config" / "etl.toml")
    with pytest.raises(ConfigError) as err:
        cfg.require_api_key()
    message = str(err.value)
    assert "ANTHROPIC_API_KEY" in message
    assert f"{tmp_path}/anthropic_api_key" in message


def test_api_key_is_read_from_the_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "anthropic_api_key").write_text("sk-ant-from-credential\n", encoding="utf-8")
    cfg = config.load({"CREDENTIALS_DIRECTORY": str(tmp_path)}, ROOT / "config" / "etl.toml")
    assert cfg.require_api_key() == "sk-ant-from-credential"


def test_price_lookup_takes_the_longest_matching_prefix() -> None:
    cfg = config.load({}, ROOT / "config" / "etl.toml")
    price = cfg.pricing.for_model("claude-haiku-4-5-20251001")
    assert price is not None and (price.input, price.output) == (1.0, 5.0)
    assert cfg.pricing.for_model("gpt-4") is None


def test_budget_caps_are_exact_decimals_and_bad_ones_are_listed(tmp_path: Path) -> None:
    from decimal import Decimal

    base = (ROOT / "config" / "etl.toml").read_text()
    good = tmp_path / "good.toml"
    good.write_text(
        base.replace("max_cost_usd_per_night = 0\n", "max_cost_usd_per_night = 200.10\n").replace(
            "[tasks.classify]\n", "[tasks.classify]\nmax_cost_usd_per_night = 12\n"
        )
    )
    cfg = config.load({}, good)
    assert cfg.submit.max_cost_usd_per_night == Decimal("200.10")
    assert cfg.tasks["classify"].max_cost_usd_per_night == Decimal(12)
    assert cfg.tasks["default"].max_cost_usd_per_night is None
    assert config.load({}, ROOT / "config" / "etl.toml").submit.max_cost_usd_per_night == 0

    bad = tmp_path / "bad.toml"
    bad.write_text(
        base.replace("max_cost_usd_per_night = 0\n", "max_cost_usd_per_night = -1\n").replace(
            "[tasks.classify]\n", '[tasks.classify]\nmax_cost_usd_per_night = "lots"\n'
        )
    )
    with pytest.raises(ConfigError) as info:
        config.load({}, bad)
    problems = str(info.value)
    assert "submit.max_cost_usd_per_night cannot be negative" in problems
    assert "tasks.classify.max_cost_usd_per_night must be a positive number" in problems


def test_a_setting_older_versions_read_loads_with_a_warning(tmp_path: Path) -> None:
    """submit.reconcile_window_seconds is read by nothing: an old file that sets it still loads, and `etl`
    says once that it is ignored; it is no setting any more (`etl config` leaves it out)."""
    from tests.conftest import run_etl

    old = tmp_path / "old.toml"
    base = (ROOT / "config" / "etl.toml").read_text()
    old.write_text(base.replace("[submit]\n", "[submit]\nreconcile_window_seconds = 900\n"))
    cfg = config.load({}, old)
    assert not hasattr(cfg.submit, "reconcile_window_seconds")
    assert len(cfg.warnings) == 1 and "submit.reconcile_window_seconds is ignored" in cfg.warnings[0]
    assert config.load({}, ROOT / "config" / "etl.toml").warnings == ()

    shown = run_etl(["config", "--config", str(old)], {})
    assert shown.returncode == 0, shown.stderr
    assert "reconcile_window_seconds" not in shown.stdout
    assert "config_setting_ignored" in shown.stderr
    assert "submit.reconcile_window_seconds is ignored" in shown.stderr
