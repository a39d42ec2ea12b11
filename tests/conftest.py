"""Shared fixtures: a throwaway database per test on SQLite *and* PostgreSQL, the emulator, a Runtime.

Store and end-to-end tests take the `db_url` fixture, which is parametrized over both databases. When
the `CI` environment variable is set, an unreachable PostgreSQL is an error, never a skip.
"""

from __future__ import annotations

import os
import re
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
from etl.runtime import Runtime, build
from etl.store import migrate

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


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    def write(extra: str = "", submit: dict[str, Any] | None = None) -> Path:
        body = TEST_TOML
        if submit:
            for key in submit:
                body = re.sub(rf"(?m)^{key} = .*\n", "", body)
            lines = "".join(f"{k} = {v!r}\n" for k, v in submit.items())
            body = body.replace("[submit]\n", "[submit]\n" + lines)
        path = tmp_path / f"etl-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(body + extra, encoding="utf-8")
        return path

    return write


@pytest.fixture
def make_runtime(
    db_url: str, emulator: EmulatorServer, clock: SharedClock, config_file: Callable[..., Path]
) -> Iterator[Callable[..., Runtime]]:
    made: list[Runtime] = []

    def make(*, extra: str = "", submit: dict[str, Any] | None = None, warehouse_url: str = "") -> Runtime:
        env = {
            "ETL_DATABASE_URL": db_url,
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
def runtime(make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime()


def insert_docs(rt: Runtime, docs: list[dict[str, Any]]) -> None:
    """Plain SQL, as a user would: only the columns they name."""
    with rt.engine.begin() as conn:
        for doc in docs:
            cols = ", ".join(doc)
            params = ", ".join(f":{k}" for k in doc)
            conn.execute(text(f"INSERT INTO etl_queue ({cols}) VALUES ({params})"), doc)


def queue_rows(rt: Runtime) -> dict[str, dict[str, Any]]:
    with rt.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, doc_key, task, status, attempts, reason FROM etl_queue ORDER BY id")
        )
        return {r.doc_key: dict(r._mapping) for r in rows}


def run_etl(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in a real process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "etl.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
