"""Real PostgreSQL roles for the least-privilege tests: made by `etl db grants --apply`, logged in as.

Roles are cluster-wide and other test runs share the server, so each database gets its own role names
(suffixed with the database's unique name), and they are dropped with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from etl.cli import main
from etl.store import migrate
from etl.store.engine import make_engine
from etl.store.grants import KINDS, Roles

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Granted:
    owner_url: str
    roles: Roles

    def url(self, kind: str) -> str:
        """The database's URL, logged in as the role of `kind` (trust auth over 127.0.0.1)."""
        return (
            make_url(self.owner_url).set(username=self.roles.of(kind)).render_as_string(hide_password=False)
        )


def cli(url: str, *args: str, warehouse: str = "") -> int:
    """`etl ARGS` in this process, on `url` (and `warehouse`, if given) with the shipped config."""
    saved = {k: os.environ.get(k) for k in ("ETL_DATABASE_URL", "ETL_CONFIG", "ETL_WAREHOUSE_URL")}
    os.environ.update(ETL_DATABASE_URL=url, ETL_CONFIG=str(ROOT / "config" / "etl.toml"))
    os.environ.pop("ETL_WAREHOUSE_URL", None)
    if warehouse:
        os.environ["ETL_WAREHOUSE_URL"] = warehouse
    try:
        return main(list(args))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def granted(owner_url: str, warehouse_url: str = "") -> Iterator[Granted]:
    """The schema made by its owner, then the three roles by `etl db grants --apply`, each able to log in."""
    suffix = make_url(owner_url).database.removeprefix("etl_t_")  # type: ignore[union-attr]
    roles = Roles(producer=f"etl_p_{suffix}", reader=f"etl_r_{suffix}", daemon=f"etl_d_{suffix}")
    engine = make_engine(owner_url)
    warehouse = make_engine(warehouse_url) if warehouse_url else engine
    try:
        migrate.upgrade(engine, warehouse)
    finally:
        engine.dispose()
        warehouse.dispose()
    databases = [u.replace("postgresql+psycopg://", "postgresql://") for u in (owner_url, warehouse_url) if u]
    try:
        args = ("db", "grants", "--apply", *(f"--{k}={roles.of(k)}" for k in KINDS))
        assert cli(owner_url, *args, warehouse=warehouse_url) == 0
        with psycopg.connect(databases[0], autocommit=True) as conn:
            for kind in KINDS:
                conn.execute(f'ALTER ROLE "{roles.of(kind)}" LOGIN')
        yield Granted(owner_url, roles)
    finally:
        _drop(databases, [roles.of(k) for k in KINDS])


def _drop(databases: list[str], names: list[str]) -> None:
    for i, url in enumerate(databases):
        with psycopg.connect(url, autocommit=True) as conn:
            for name in names:
                if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                    continue
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,)
                )
                conn.execute(f'DROP OWNED BY "{name}"')
                if i == len(databases) - 1:
                    conn.execute(f'DROP ROLE "{name}"')
