"""The stateful fault model (tests/reliability/stateful.py) on SQLite and PostgreSQL, and every failure it
ever found, kept as a named, deterministic regression example.

CI size: `ETL_STATEFUL_EXAMPLES` examples per database (default 200); the nightly size is
`ETL_STATEFUL_EXAMPLES=5000`. The draws are derandomized, so a CI run is reproducible; the fault
combinations reached are printed at the end of the session (and written next to the verdict table).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from etl.emulator import EmulatorServer
from tests.reliability import stateful
from tests.reliability.stateful import World

STEPS_PER_EXAMPLE = 8
SUMMARY: list[str] = []


@pytest.fixture
def world(db_url: str, tmp_path: Path, emulator: EmulatorServer) -> Iterator[World]:
    w = stateful.make_world(
        "sqlite" if db_url.startswith("sqlite") else "postgresql", db_url, tmp_path, emulator
    )
    yield w
    w.engine.dispose()
    if w.provider is not None:
        w.provider._inner.close()


@pytest.mark.timeout(1800)
def test_generated_fault_sequences_keep_every_invariant(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    n = stateful.examples_per_db()
    try:
        run_state_machine_as_test(
            stateful.machine_for(world),
            settings=settings(
                max_examples=n,
                stateful_step_count=STEPS_PER_EXAMPLE,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
                report_multiple_bugs=False,
                # ETL_STATEFUL_SHRINK=0 when hunting: report the first failing sequence as found
                phases=[Phase.explicit, Phase.reuse, Phase.generate]
                + ([Phase.shrink] if os.environ.get("ETL_STATEFUL_SHRINK", "1") != "0" else []),
            ),
        )
    finally:
        combos = world.combos
        line = (
            f"stateful[{world.db}]: {world.examples} examples, {sum(combos.values())} etl runs, "
            f"{len(combos)} distinct fault combinations reached"
        )
        SUMMARY.append(line)
        path = tmp_path_factory.getbasetemp() / f"stateful-combinations-{world.db}.txt"
        path.write_text(
            line + "\n" + "".join(f"{c:6d}  {k}\n" for k, c in combos.most_common()), encoding="utf-8"
        )
        SUMMARY.append(f"  combinations written to {path}")
