"""Fixtures for the fault matrix: the launcher of real `etl` processes, scenarios, and the verdict table
printed at the end of the session (and written to `reliability-verdicts.txt` under pytest's tmp dir)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from etl.emulator import EmulatorControl, EmulatorServer
from tests.conftest import SharedClock
from tests.reliability import checker
from tests.reliability.harness import SETTINGS, VERDICTS, Scenario, build_scenario
from tests.reliability.launcher import Launcher

_TABLE_PATH: list[Path] = []


@pytest.fixture(scope="session")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    workdir = tmp_path_factory.mktemp("etl-runs")
    launch = Launcher(workdir)
    yield launch
    launch.close()


@pytest.fixture(scope="session", autouse=True)
def verdict_table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if VERDICTS:
        path = tmp_path_factory.getbasetemp() / "reliability-verdicts.txt"
        path.write_text(render_table(), encoding="utf-8")
        _TABLE_PATH.append(path)


def render_table() -> str:
    width = max(len(v.scenario) for v in VERDICTS)
    head = f"{'scenario':<{width}}  " + "  ".join(f"{name:>13}" for name in checker.INVARIANTS)
    lines = [head, "-" * len(head)]
    for v in VERDICTS:
        cells = []
        for name in checker.INVARIANTS:
            ok = v.results.get(name, (True, ""))[0]
            cells.append(f"{'ok' if ok else 'FAIL':>13}")
        lines.append(f"{v.scenario:<{width}}  " + "  ".join(cells))
    failed = [v for v in VERDICTS if not v.ok]
    lines.append("-" * len(head))
    lines.append(
        f"{len(VERDICTS)} scenarios, {len(VERDICTS) - len(failed)} passed every invariant, {len(failed)} failed"
    )
    for v in failed:
        lines += [f"  {v.scenario}: {f}" for f in v.failures()]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.reliability.test_stateful import SUMMARY

    if SUMMARY:
        terminalreporter.section("stateful fault model")
        for line in SUMMARY:
            terminalreporter.write_line(line)
    if not VERDICTS:
        return
    terminalreporter.section("fault matrix: scenario x invariant")
    terminalreporter.write(render_table())
    if _TABLE_PATH:
        terminalreporter.write_line(f"verdict table written to {_TABLE_PATH[0]}")


@pytest.fixture
def make_scenario(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    launcher: Launcher,
    emulator: EmulatorServer,
    control: EmulatorControl,
    clock: SharedClock,
    make_pg_database: Callable[[], str],
) -> Iterator[Callable[..., Scenario]]:
    made: list[Scenario] = []

    def make(name: str, db: str, *, separate_warehouse: bool = False, **settings: Any) -> Scenario:
        if db == "sqlite":
            url = f"sqlite:///{tmp_path / 'etl.db'}"
            wh = f"sqlite:///{tmp_path / 'warehouse.db'}" if separate_warehouse else url
        else:
            url = make_pg_database()
            wh = make_pg_database() if separate_warehouse else url
        sc = build_scenario(
            name=name,
            db=db,
            url=url,
            warehouse_url=wh,
            tmp=tmp_path,
            launcher=launcher,
            emulator=emulator,
            control=control,
            clock=clock,
            settings={**SETTINGS, **settings},
        )
        made.append(sc)
        return sc

    yield make
    for sc in made:
        sc.close()
