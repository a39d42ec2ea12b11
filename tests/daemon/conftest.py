"""Fixtures for the daemon tests: throwaway databases, an emulator, and real `etl` processes.

Local on purpose (tests/conftest.py belongs to the pipeline suite): SQLite files in tmp_path and, for the
multi-instance tests, a PostgreSQL database created per test. With CI set, PostgreSQL must be there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from etl.emulator import EmulatorConfig, EmulatorControl, EmulatorServer
from etl.store import migrate
from etl.store.engine import make_engine
from tests.conftest import HOST_ONLY, write_config

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
KEY = "etl-daemon-test-key-5f1c9a7e3b2d"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll for an outcome of real work (not for scheduled time to pass)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def query(url: str, sql: str, **params: Any) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'etl.db'}"


def pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database for as long as the generator runs (a fixture or a test's own)."""
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but PostgreSQL does not answer at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    name = f"etl_t_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from pg_database()


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer(EmulatorConfig(port=0, processing_seconds=1, require_key=KEY)).start()
    yield server
    server.stop()


@pytest.fixture
def control(emulator: EmulatorServer) -> EmulatorControl:
    return EmulatorControl(emulator.base_url)


QUEUE_INSERT = "INSERT INTO etl_queue (doc_key, body) VALUES (:k, :b)"


def nightly(n: int) -> list[dict[str, str]]:
    """`n` documents for `QUEUE_INSERT`: doc-0, doc-1, ..."""
    return [{"k": f"doc-{i}", "b": f"Document {i} about quarterly logistics."} for i in range(n)]


def execute(url: str, sql: str, params: list[dict[str, Any]] | dict[str, Any] | None = None) -> None:
    """One statement in a transaction of its own, logged in as `url` (a role's URL, say), the way any
    other system writes: its own connection, closed after."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params or {})
    finally:
        engine.dispose()


def prepare_db(url: str, docs: int) -> None:
    """Schema plus `docs` queued documents, written the way any other system would: plain SQL."""
    engine = make_engine(url)
    try:
        migrate.upgrade(engine, engine)
    finally:
        engine.dispose()
    if docs:
        execute(url, QUEUE_INSERT, nightly(docs))


@dataclass
class EtlProcess:
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def logged(self, event: str) -> bool:
        return f'"event": "{event}"' in self.output()

    def stopped_by_failpoint(self) -> bool:
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def etl_env(tmp_path: Path, emulator: EmulatorServer) -> Callable[..., dict[str, str]]:
    def make(db_url: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY)}
        env.update(
            ETL_DATABASE_URL=db_url,
            ETL_CONFIG=str(extra.pop("config", None) or write_config(tmp_path)),
            ANTHROPIC_API_KEY=KEY,
            ANTHROPIC_BASE_URL=emulator.base_url,
            PYTHONUNBUFFERED="1",
            # the metrics page on, on a port of its own (its `metrics_serving` event names it): daemons of
            # parallel tests never contend for 9464
            ETL_METRICS_LISTEN="127.0.0.1:0",
        )
        env.update(extra)
        return env

    return make


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., EtlProcess]]:
    started: list[EtlProcess] = []

    def start(env: dict[str, str], *args: str) -> EtlProcess:
        n = len(started)
        out, err = tmp_path / f"etl-{n}.out", tmp_path / f"etl-{n}.err"
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl.cli", *args],
            env=env,
            cwd=tmp_path,
            stdout=out.open("wb"),
            stderr=err.open("wb"),
        )
        p = EtlProcess(proc, out, err)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


__all__ = ["KEY", "ROOT", "create_engine", "execute", "nightly", "prepare_db", "query", "wait_for"]
