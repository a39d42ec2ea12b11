"""The shipped alert rules (deploy/prometheus/): promtool checks them and runs their unit tests, every alert
is tested firing, and every runbook names the etl command to run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from etl import metrics
from tests.conftest import prometheus_tool

HERE = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = HERE / "etl.rules.yml"
RULE_TESTS = HERE / "etl.rules.test.yml"


def promtool() -> str:
    return prometheus_tool("promtool")


def alerts(text: str) -> list[str]:
    return re.findall(r"(?m)^\s+- alert: (\w+)$", text)


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name], cwd=HERE, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_the_sample_prometheus_config_is_valid(tmp_path: Path) -> None:
    tool = promtool()
    sample = (HERE / "prometheus.yml").read_text(encoding="utf-8")
    assert "/etc/prometheus/etl.rules.yml" in sample
    config = tmp_path / "prometheus.yml"
    config.write_text(sample.replace("/etc/prometheus/etl.rules.yml", str(RULES)), encoding="utf-8")
    check = subprocess.run([tool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    shipped = alerts(RULES.read_text(encoding="utf-8"))
    assert len(shipped) == len(set(shipped)) >= 10
    tests = RULE_TESTS.read_text(encoding="utf-8")
    # an alertname followed by a non-empty exp_alerts list (not `exp_alerts: []`)
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n", tests))
    assert set(shipped) <= firing, f"never tested firing: {sorted(set(shipped) - firing)}"
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    assert set(shipped) - {"EtlDaemonAbsent"} <= quiet, f"never tested quiet: {sorted(set(shipped) - quiet)}"


def test_every_runbook_names_an_etl_command_and_every_metric_exists() -> None:
    text = RULES.read_text(encoding="utf-8")
    runbooks = re.findall(r"runbook: \"(.*)\"", text)
    assert len(runbooks) == len(alerts(text))
    for line in runbooks:
        assert re.search(r"`etl [a-z]", line), line
    source = Path(metrics.__file__).read_text(encoding="utf-8")
    for name in set(re.findall(r"\betl_[a-z_]+", text)):
        base = name.removesuffix("_total")
        assert f'"{base}"' in source, f"{name} is in a rule but not on the page"
