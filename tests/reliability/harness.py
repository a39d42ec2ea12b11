"""A scenario: a fresh database (SQLite file or throwaway PostgreSQL), the emulator, real `etl` processes,
and the checker's verdict at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from etl.emulator import EmulatorControl, EmulatorServer
from etl.store import migrate
from etl.store.engine import make_engine
from tests.conftest import API_KEY, TASKS_TOML, SharedClock, write_config
from tests.reliability import checker
from tests.reliability.launcher import Child, Finished, Launcher

VERDICTS: list[checker.Verdict] = []

PROCESSING_SECONDS = 60  # the emulator fixture's; a clock advance past it ends every batch
SETTINGS: dict[str, Any] = {
    "max_attempts": 3,
    "max_requests_per_batch": 5,
    "claim_lease_seconds": 120,
    "reconcile_grace_seconds": 600,
    "create_timeout_seconds": 1.0,
}

CONFIG = """
[api]
timeout_seconds = 5

[submit]

[collect]
chunk_size = 3
stream_retries = 2
stream_backoff_seconds = 0.05
stream_timeout_seconds = 1

"""


@dataclass
class Scenario:
    name: str
    db: str
    url: str
    warehouse_url: str
    config: Path
    settings: dict[str, Any]
    launcher: Launcher
    emulator: EmulatorServer
    control: EmulatorControl
    clock: SharedClock
    engine: Engine
    warehouse: Engine
    runs: list[Finished] = field(default_factory=list)

    # --- processes -------------------------------------------------------------------------------
    def env(self, failpoints: str = "", offset: float = 0.0, **extra: str) -> dict[str, str]:
        env = {
            "ETL_CONFIG": str(self.config),
            "ETL_DATABASE_URL": self.url,
            "ANTHROPIC_BASE_URL": self.emulator.base_url,
            "ANTHROPIC_API_KEY": API_KEY,
            "ETL_CLOCK_OFFSET_SECONDS": str(self.clock.offset.total_seconds() + offset),
            "ETL_LOG_LEVEL": "info",
        }
        if self.warehouse_url != self.url:
            env["ETL_WAREHOUSE_URL"] = self.warehouse_url
        if failpoints:
            env["ETL_FAILPOINTS"] = failpoints
        env.update(extra)
        return env

    def spawn(self, *args: str, failpoints: str = "", offset: float = 0.0) -> Child:
        return self.launcher.spawn(list(args), self.env(failpoints, offset))

    def run(self, *args: str, failpoints: str = "", offset: float = 0.0, timeout: float = 120) -> Finished:
        done = self.launcher.run(list(args), self.env(failpoints, offset), timeout)
        self.runs.append(done)
        if done.returncode not in (0, 3, 75, -9) or "Traceback" in done.stderr:
            raise AssertionError(f"unexpected crash: {done}")
        return done

    # --- data ------------------------------------------------------------------------------------
    def insert(self, docs: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            for doc in docs:
                cols = ", ".join(doc)
                params = ", ".join(f":{k}" for k in doc)
                conn.execute(text(f"INSERT INTO etl_queue ({cols}) VALUES ({params})"), doc)

    def insert_plain(self, n: int, prefix: str = "d") -> None:
        with self.engine.begin() as conn:
            conn.execute(
                text("INSERT INTO etl_queue (doc_key, body) VALUES (:k, :b)"),
                [
                    {"k": f"{prefix}{i}", "b": f"document {i} about {prefix} number {i * 13}"}
                    for i in range(n)
                ],
            )

    def count(self, sql: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())

    def statuses(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                r[0]: int(r[1])
                for r in conn.execute(text("SELECT status, count(*) FROM etl_queue GROUP BY status"))
            }

    def intent_statuses(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                r[0]: int(r[1])
                for r in conn.execute(text("SELECT status, count(*) FROM etl_batches GROUP BY status"))
            }

    # --- recovery --------------------------------------------------------------------------------
    def settled(self) -> bool:
        rows = self.statuses()
        open_ = self.intent_statuses()
        return not any(rows.get(s) for s in ("queued", "claimed", "submitted")) and not any(
            open_.get(s) for s in ("claimed", "sending", "unknown", "submitted", "ended")
        )

    def complete(self, rounds: int = 6) -> None:
        """Restart without failpoints and run nights and mornings until everything is settled: each round
        moves time past the claim lease and the reconcile grace, then submits, ends the batches, collects."""
        step = self.settings["claim_lease_seconds"] + self.settings["reconcile_grace_seconds"] + 60
        for _ in range(rounds):
            if self.settled():
                return
            self.clock.advance(step)
            self.run("submit")
            self.clock.advance(PROCESSING_SECONDS + 60)
            self.run("collect", "--no-report")
        assert self.settled(), (
            f"not settled after {rounds} rounds: {self.statuses()} {self.intent_statuses()}"
        )

    # --- verdict ---------------------------------------------------------------------------------
    def verdict(
        self, fault: tuple[bool, str], *, final: bool = True, allow_queued: bool = False
    ) -> checker.Verdict:
        cycle = timedelta(
            seconds=self.settings["reconcile_grace_seconds"] + self.settings["claim_lease_seconds"]
        )
        snap = checker.snapshot(self.engine, self.warehouse, self.control.ledger())
        v = checker.check(
            snap,
            scenario=f"{self.name}[{self.db}]",
            max_attempts=self.settings["max_attempts"],
            now=self.clock(),
            reconcile_cycle=cycle,
            final=final,
            fault=fault,
            allow_queued=allow_queued,
        )
        VERDICTS.append(v)
        assert v.ok, (
            f"{v.scenario}: "
            + " | ".join(v.failures())
            + f"\nfault: {fault[1]}\n"
            + "\n".join(map(str, self.runs[-3:]))
        )
        return v

    def close(self) -> None:
        self.engine.dispose()
        self.warehouse.dispose()


ScenarioFactory = Callable[..., Scenario]


def build_scenario(
    *,
    name: str,
    db: str,
    url: str,
    warehouse_url: str,
    tmp: Path,
    launcher: Launcher,
    emulator: EmulatorServer,
    control: EmulatorControl,
    clock: SharedClock,
    settings: dict[str, Any],
) -> Scenario:
    config = write_config(
        tmp / "etl-reliability.toml",
        CONFIG + TASKS_TOML,
        **{("collect." if k == "chunk_size" else "submit.") + k: v for k, v in settings.items()},
    )
    engine = make_engine(url)
    warehouse = engine if warehouse_url == url else make_engine(warehouse_url)
    migrate.upgrade(engine, warehouse)
    return Scenario(
        name, db, url, warehouse_url, config, settings, launcher, emulator, control, clock, engine, warehouse
    )
