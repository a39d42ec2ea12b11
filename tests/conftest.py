"""Shared fixtures: a throwaway database per test on SQLite *and* PostgreSQL, the emulator, a Harness.

Store and end-to-end tests take the `db_url` fixture, which is parametrized over both databases. When
the `CI` environment variable is set, an unreachable PostgreSQL is an error, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from etl import config as config_mod
from etl.clock import utcnow
from etl.emulator import EmulatorConfig, EmulatorControl, EmulatorServer
from etl.store import migrate
from tests.harness import Harness, build

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("ETL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
API_KEY = "local-emulator-test-key-0123456789"


def _pg_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip()


@pytest.fixture(scope="session")
def pg_admin() -> str:
    problem = _pg_available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but PostgreSQL at {PG_ADMIN} does not answer: {problem}")
        pytest.skip(f"PostgreSQL not available: {problem}")
    return PG_ADMIN


def _pg_url(admin: str, name: str) -> str:
    base = admin.rsplit("/", 1)[0]
    return f"{base}/{name}"


@pytest.fixture
def make_pg_database(request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def make() -> str:
        admin = request.getfixturevalue("pg_admin")
        name = f"etl_t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return _pg_url(admin, name)

    yield make
    if created:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for name in created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, make_pg_database: Callable[[], str]) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'etl.db'}"
    return make_pg_database()


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer(EmulatorConfig(port=0, processing_seconds=60.0, seed=7)).start()
    yield server
    server.stop()


@pytest.fixture
def control(emulator: EmulatorServer) -> EmulatorControl:
    return EmulatorControl(emulator.base_url)


class SharedClock:
    """The tests' clock: real time plus an offset that moves together with the emulator's clock."""

    def __init__(self, control: EmulatorControl) -> None:
        self.control = control
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.control.advance(seconds)
        self.offset += timedelta(seconds=seconds)

    @property
    def env(self) -> dict[str, str]:
        return {"ETL_CLOCK_OFFSET_SECONDS": str(self.offset.total_seconds())}


@pytest.fixture
def clock(control: EmulatorControl) -> SharedClock:
    return SharedClock(control)


TEST_TOML = """
[submit]
max_attempts = 3
reconcile_grace_seconds = 600

[collect]
stream_retries = 2
stream_backoff_seconds = 0.05
stream_timeout_seconds = 5

"""

# The tasks every test configuration uses (the reliability harness shares them).
TASKS_TOML = """
[tasks.default]
model = "claude-haiku-4-5"
system = "Summarise documents."
template = "Summarise:\\n{body}"
max_tokens = 200

[tasks.classify]
model = "claude-haiku-4-5"
template = "Title: {title}\\n{body}"
max_tokens = 100

[tasks.classify.output_schema]
type = "object"
required = ["category"]

[tasks.classify.output_schema.properties.category]
type = "string"
enum = ["finance", "legal", "other"]
"""
TEST_TOML += TASKS_TOML


SHIPPED_CONFIG = ROOT / "config" / "etl.toml"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (str, list)) else repr(value)


def write_config(where: Path, base: str | None = None, **settings: Any) -> Path:
    """A config file: `base` (the shipped config/etl.toml by default) with each `section.key` of `settings`
    set, its line replaced where `base` has one, else added at the top of its section (made if missing).

    `where` is the file, or a folder to write `config/etl.toml` into.
    """
    path = where if where.suffix == ".toml" else where / "config" / "etl.toml"
    text_ = SHIPPED_CONFIG.read_text(encoding="utf-8") if base is None else base
    pending = {tuple(k.rsplit(".", 1)): v for k, v in settings.items()}
    lines: list[str] = []
    section = ""
    for line in text_.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[]")
        key = stripped.split("=", 1)[0].strip()
        if "=" in stripped and not stripped.startswith("#") and (section, key) in pending:
            line = f"{key} = {_toml(pending.pop((section, key)))}"
        lines.append(line)
    for (section, key), value in pending.items():  # settings the base does not name
        header = f"[{section}]"
        at = next((i + 1 for i, line in enumerate(lines) if line.strip() == header), None)
        if at is None:
            lines += ["", header]
            at = len(lines)
        lines.insert(at, f"{key} = {_toml(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    def write(extra: str = "", submit: dict[str, Any] | None = None) -> Path:
        settings = {f"submit.{k}": v for k, v in (submit or {}).items()}
        path = write_config(tmp_path / f"etl-{uuid.uuid4().hex[:6]}.toml", TEST_TOML, **settings)
        path.write_text(path.read_text(encoding="utf-8") + extra, encoding="utf-8")
        return path

    return write


@pytest.fixture
def make_runtime(
    db_url: str, emulator: EmulatorServer, clock: SharedClock, config_file: Callable[..., Path]
) -> Iterator[Callable[..., Harness]]:
    """Runtimes on `db_url` (or, with `url`, another database: a second installation), migrated."""
    made: list[Harness] = []

    def make(
        *, extra: str = "", submit: dict[str, Any] | None = None, warehouse_url: str = "", url: str = ""
    ) -> Harness:
        env = {
            "ETL_DATABASE_URL": url or db_url,
            "ANTHROPIC_BASE_URL": emulator.base_url,
            "ANTHROPIC_API_KEY": API_KEY,
        }
        if warehouse_url:
            env["ETL_WAREHOUSE_URL"] = warehouse_url
        cfg = config_mod.load(env, config_file(extra, submit))
        rt = build(cfg, clock=clock)
        migrate.upgrade(rt.engine, rt.warehouse)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


@pytest.fixture
def runtime(make_runtime: Callable[..., Harness]) -> Harness:
    return make_runtime()


def insert_docs(rt: Harness, docs: list[dict[str, Any]]) -> None:
    """Plain SQL, as a user would: only the columns they name."""
    with rt.engine.begin() as conn:
        for doc in docs:
            cols = ", ".join(doc)
            params = ", ".join(f":{k}" for k in doc)
            conn.execute(text(f"INSERT INTO etl_queue ({cols}) VALUES ({params})"), doc)


def queue_rows(rt: Harness) -> dict[str, dict[str, Any]]:
    with rt.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, doc_key, task, status, attempts, reason FROM etl_queue ORDER BY id")
        )
        return {r.doc_key: dict(r._mapping) for r in rows}


def prometheus_tool(name: str) -> str:
    """The path of Debian's `prometheus` or `promtool`; a skip without it (a failure under CI)."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {name} is missing: scripts/ensure-prometheus.sh installs it")
        pytest.skip(
            f"{name} not installed (scripts/ensure-prometheus.sh installs Debian's prometheus package)"
        )
    return found


# Variables of the host that a command under test must not inherit: its own settings, and systemd's
# (a test run under a service manager would otherwise hand etl its notify socket or credentials).
HOST_ONLY = ("ETL_", "ANTHROPIC_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_")


def run_etl(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in a real process: `env` over the host's environment without its `HOST_ONLY` variables."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY)}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "etl.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
