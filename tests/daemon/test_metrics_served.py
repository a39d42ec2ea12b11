"""`etl run` serves the metrics page; a real Prometheus scrapes it and fires a shipped alert.

The end-to-end test needs Debian's `prometheus` package (scripts/ensure-prometheus.sh installs it): it is
skipped, with the reason, only when it is missing outside CI.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from etl.emulator import EmulatorControl
from tests.conftest import prometheus_tool, run_etl, write_config
from tests.daemon.conftest import ROOT, EtlProcess, prepare_db, wait_for

DAY = 86400
RULES = ROOT / "deploy" / "prometheus" / "etl.rules.yml"
# What an operator's Prometheus must see (issue 22's list): one name for each.
EXPECTED = {
    "etl_queue_rows",
    "etl_queue_oldest_queued_age_seconds",
    "etl_batches",
    "etl_batch_results_expiry_seconds",
    "etl_job_last_run_timestamp_seconds",
    "etl_job_last_run_outcome",
    "etl_job_last_success_timestamp_seconds",
    "etl_documents_total",
    "etl_tokens_total",
    "etl_cost_usd_total",
    "etl_standard_cost_usd_total",
    "etl_budget_cap_usd",
    "etl_budget_reserved_usd",
    "etl_budget_waiting_documents",
    "etl_live_calls_total",
    "etl_live_refused_total",
    "etl_intents_unknown",
    "etl_stranded_rows",
    "etl_unexplained_batches",
    "etl_health_ok",
    "etl_health_problems",
    "etl_submission_paused",
    "etl_database_up",
    "process_start_time_seconds",
}


def served_url(p: EtlProcess) -> str:
    """The page's URL from the daemon's `metrics_serving` event (it listens on a port of its own)."""

    def find() -> str | None:
        for line in p.output().splitlines():
            if '"metrics_serving"' in line:
                return str(json.loads(line)["url"])
        assert p.proc.poll() is None, p.output()
        return None

    return str(wait_for(find, what="the metrics_serving event"))


def scrape(url: str) -> tuple[str, dict[str, float]]:
    """The page, and its samples by `name{label="value",...}` (labels sorted)."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        page = resp.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return page, samples


def refused(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


def test_the_daemon_serves_the_page_and_closes_it_on_sigterm(
    any_url: str, etl_env: Callable[..., dict[str, str]], spawn: Callable[..., EtlProcess]
) -> None:
    prepare_db(any_url, 4)
    p = spawn(etl_env(any_url), "run")
    url = served_url(p)
    text, page = scrape(url)
    assert page['etl_queue_rows{status="queued",task="default"}'] == 4
    assert page["etl_database_up"] == 1 and page["etl_health_ok"] == 1
    assert page["etl_live_calls_total"] == 0 and page["process_start_time_seconds"] > 0
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    assert p.terminate() == 0, p.output()
    assert refused(url)


def test_a_taken_port_leaves_the_daemon_running_and_says_so(
    sqlite_url: str, etl_env: Callable[..., dict[str, str]], spawn: Callable[..., EtlProcess]
) -> None:
    prepare_db(sqlite_url, 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = spawn(etl_env(sqlite_url, ETL_METRICS_LISTEN=f"127.0.0.1:{port}"), "run")
        wait_for(lambda: p.logged("daemon_started"), what="the daemon to start")
        assert p.logged("metrics_unavailable") and p.proc.poll() is None
        assert p.terminate() == 0, p.output()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus_bin() -> str:
    return prometheus_tool("prometheus")


@pytest.fixture
def start_prometheus(tmp_path: Path, prometheus_bin: str) -> Iterator[Callable[[str], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            f"  - job_name: etl\n    static_configs: [{{targets: [{json.dumps(target)}]}}]\n",
            encoding="utf-8",
        )
        address = f"127.0.0.1:{free_port()}"
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={address}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
            )
        )
        return f"http://{address}"

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def api(base: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"{base}/api/v1/{path}", timeout=10) as resp:
            return json.loads(resp.read())["data"]
    except OSError:
        return None  # not listening yet


def firing(base: str, name: str) -> dict[str, Any] | None:
    data = api(base, "alerts") or {"alerts": []}
    return next(
        (a for a in data["alerts"] if a["labels"]["alertname"] == name and a["state"] == "firing"), None
    )


def test_a_real_prometheus_scrapes_etl_run_and_fires_on_a_batch_28_days_old(
    tmp_path: Path,
    sqlite_url: str,
    etl_env: Callable[..., dict[str, str]],
    spawn: Callable[..., EtlProcess],
    control: EmulatorControl,
    start_prometheus: Callable[[str], str],
) -> None:
    prepare_db(sqlite_url, 3)
    cfg = str(write_config(tmp_path, **{"submit.max_cost_usd_per_night": 100}))
    sent = run_etl(["submit"], etl_env(sqlite_url, config=cfg))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # 28 days on, on both clocks; the API answers no retrieve, so nothing collects the batch
    control.advance(28 * DAY)
    control.set_faults(rules=[{"endpoint": "retrieve", "action": "status", "status": 500}])
    env = etl_env(sqlite_url, config=cfg, ETL_CLOCK_OFFSET_SECONDS=str(28 * DAY), ETL_DAEMON_RUN_NOW="submit")
    p = spawn(env, "run")
    target = served_url(p).split("//")[1].split("/")[0]
    base = start_prometheus(target)

    alert = wait_for(lambda: firing(base, "EtlBatchResultsNearExpiry"), timeout=90, what="the alert to fire")
    assert "etl collect" in alert["annotations"]["runbook"]
    assert float(alert["value"]) == pytest.approx(DAY, abs=3600)
    wait_for(
        lambda: (api(base, "query?query=etl_job_last_run_timestamp_seconds") or {}).get("result"), timeout=120
    )
    names = set(api(base, "label/__name__/values"))
    assert names >= EXPECTED, sorted(EXPECTED - names)
    up = api(base, 'query?query=up{job="etl"}')["result"]
    assert [r["value"][1] for r in up] == ["1"]
    assert p.terminate() == 0, p.output()
