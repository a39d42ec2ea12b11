"""The benchmark harness works end to end at a small size (no timing is asserted: CI machines vary).

`--repeat 2` also runs each measurement again on a restored copy of the database, with the order reversed.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RESULT = re.compile(
    r"^RESULT db=(?P<db>\w+) docs=(?P<docs>\d+) submit_s=(?P<submit_s>[\d.]+) "
    r"submit_ratio=(?P<submit_ratio>[\d.]+) collect_s=(?P<collect_s>[\d.]+) "
    r"collect_ratio=(?P<collect_ratio>[\d.]+) submit_rss_mb=(?P<submit_rss>\d+) "
    r"collect_rss_mb=(?P<collect_rss>\d+) submit_cpu_ratio=(?P<submit_cpu>[\d.]+) "
    r"collect_cpu_ratio=(?P<collect_cpu>[\d.]+) warm=(?P<warm>yes|no)$"
)


@pytest.mark.parametrize(
    ("db", "repeat", "warm"),
    [
        ("sqlite", 1, False),
        ("sqlite", 2, False),
        ("postgresql", 1, False),
        ("postgresql", 2, False),
        ("sqlite", 1, True),
        ("postgresql", 1, True),
    ],
)
def test_bench_run_prints_a_parsable_result_line(
    db: str, repeat: int, warm: bool, request: pytest.FixtureRequest
) -> None:
    if db == "postgresql":
        request.getfixturevalue("pg_admin")  # skips without PostgreSQL, fails instead when CI is set
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--docs",
            "2000",
            "--db",
            db,
            "--repeat",
            str(repeat),
            *(["--warm"] if warm else []),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = RESULT.match(last)
    assert match, last
    assert (match["db"], match["docs"]) == (db, "2000")
    assert float(match["submit_s"]) > 0 and float(match["collect_s"]) > 0
    assert int(match["submit_rss"]) > 0 and int(match["collect_rss"]) > 0
    assert float(match["submit_cpu"]) > 0 and float(match["collect_cpu"]) > 0
    assert match["warm"] == ("yes" if warm else "no")
    measured = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("etl_")]
    assert measured == ["etl_submit"] * repeat + ["etl_collect"] * repeat


LIVE = re.compile(
    r"^LIVE db=(?P<db>\w+) docs=16 concurrency=4 latency_s=0.05 worker_s=[\d.]+ baseline_s=[\d.]+ "
    r"ratio=[\d.]+ pickup_p50_s=[\d.]+ pickup_p99_s=[\d.]+ samples=2$"
)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_live_bench_prints_a_parsable_result_line(db: str, request: pytest.FixtureRequest) -> None:
    if db == "postgresql":
        request.getfixturevalue("pg_admin")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "live.py"),
            "--db",
            db,
            "--docs",
            "16",
            "--concurrency",
            "4",
            "--latency",
            "0.05",
            "--samples",
            "2",
            "--poll",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = LIVE.match(last)
    assert match and match["db"] == db, last


def test_metrics_bench_prints_a_parsable_result_line_with_the_submit_comparison() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "metrics.py"),
            "--docs",
            "500",
            "--db",
            "sqlite",
            "--submit",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(
        r"^RESULT db=sqlite docs=500 scrape_s=[\d.]+ status_s=[\d.]+ submit_s=[\d.]+ submit_scraped_s=[\d.]+ "
        r"slowdown=[-+][\d.]+$",
        last,
    ), last


def test_per_result_bench_runs_the_collectors_own_code_on_both_encoders() -> None:
    """bench/per_result.py calls the collector's internals (`_Pass.sort`, `Chunk.add`): it breaks, and says
    so here, when they change shape."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "per_result.py"), "--lines", "2000"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    found = re.findall(r"^RESULT db=(\w+) lines=2000 us_per_result=[\d.]+ ratio=[\d.]+$", proc.stdout, re.M)
    assert found == ["sqlite", "postgresql"], proc.stdout
