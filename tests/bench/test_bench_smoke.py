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
    r"collect_rss_mb=(?P<collect_rss>\d+)$"
)


@pytest.mark.parametrize(
    ("db", "repeat"), [("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2)]
)
def test_bench_run_prints_a_parsable_result_line(
    db: str, repeat: int, request: pytest.FixtureRequest
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
    measured = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("etl_")]
    assert measured == ["etl_submit"] * repeat + ["etl_collect"] * repeat
