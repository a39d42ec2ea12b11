"""What each database can do, in one place: code outside this module never tests a dialect's name.

Code that behaves differently on SQLite and PostgreSQL asks `capabilities(engine)` a question about the
database (does it hold advisory locks? can it store a NUL?) rather than testing which one it is. Two
databases are supported; each is one frozen `Capabilities` below. Declarations keyed by dialect stay
where they are declared (a column type's `with_variant`, a `@compiles` for SQLite), and `engine` reads
the URL to open a SQLite file the way it must be opened, before any engine exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, Table
from sqlalchemy.dialects import postgresql, sqlite


@dataclass(frozen=True)
class Capabilities:
    """One database's answers. `name` is for messages only: branch on the fields."""

    name: str
    # A server beside this process (PostgreSQL): its work on a statement runs beside ours. SQLite runs in
    # this process, so one UPDATE at the end costs less than one per chunk (see `settlement`).
    server: bool
    # Session-held `pg_advisory_lock`s: the proof of life and the budget lock. Without them a file lock
    # (flock beside the database file) stands in, and SQLite's single writer serialises the budget.
    advisory_locks: bool
    # LISTEN/NOTIFY: the live worker is woken by a trigger instead of polling.
    listen_notify: bool
    # `SELECT ... FOR UPDATE SKIP LOCKED`, picked once in a CTE.
    skip_locked: bool
    # Whether text may hold a NUL character (PostgreSQL's text cannot).
    nul_in_text: bool
    # Timestamps stored with their zone (`timestamptz`); SQLite keeps naive UTC text.
    tz_aware_timestamps: bool
    # An exact NUMERIC type; on SQLite money is an INTEGER count of its smallest unit.
    exact_numeric: bool
    # Arrays as bound parameters (`= ANY(:ids)`); on SQLite a JSON array through `json_each`.
    array_params: bool
    # `COPY ... FROM STDIN` into a temp table for bulk writes; on SQLite one prepared upsert.
    bulk_copy: bool
    # Database roles and GRANTs; on SQLite the file's permissions decide.
    roles: bool
    # ALTER TABLE changes columns in place; on SQLite alembic copies the table ("batch" mode).
    alter_in_place: bool
    # Triggers written in PL/pgSQL (the live path's NOTIFY, the insert-only `queued` guard).
    plpgsql: bool
    # A WAL that this process checkpoints (SQLite); a server checkpoints on its own schedule.
    own_checkpoints: bool


POSTGRESQL = Capabilities(
    name="postgresql",
    server=True,
    advisory_locks=True,
    listen_notify=True,
    skip_locked=True,
    nul_in_text=False,
    tz_aware_timestamps=True,
    exact_numeric=True,
    array_params=True,
    bulk_copy=True,
    roles=True,
    alter_in_place=True,
    plpgsql=True,
    own_checkpoints=False,
)

SQLITE = Capabilities(
    name="sqlite",
    server=False,
    advisory_locks=False,
    listen_notify=False,
    skip_locked=False,
    nul_in_text=True,
    tz_aware_timestamps=False,
    exact_numeric=False,
    array_params=False,
    bulk_copy=False,
    roles=False,
    alter_in_place=False,
    plpgsql=False,
    own_checkpoints=True,
)

_BY_NAME = {c.name: c for c in (POSTGRESQL, SQLITE)}


def capabilities(bind: Engine | Connection | Dialect) -> Capabilities:
    """What the database behind `bind` (an engine, a connection or a dialect) can do."""
    dialect = bind if isinstance(bind, Dialect) else bind.dialect
    try:
        return _BY_NAME[dialect.name]
    except KeyError:
        raise ValueError(f"unsupported database {dialect.name!r}: etl runs on SQLite or PostgreSQL") from None


def database_file(engine: Engine | Connection) -> Path | None:
    """The file a SQLite database lives in, as its URL names it (None for a server or an in-memory one)."""
    if capabilities(engine).server:
        return None
    database = engine.engine.url.database if isinstance(engine, Connection) else engine.url.database
    return None if database in (None, "", ":memory:") else Path(database)


def insert_for(caps: Capabilities, table: Table) -> Any:
    """The database's own INSERT for `table` (with `on_conflict_do_update`, which plain SQL lacks)."""
    return postgresql.insert(table) if caps is POSTGRESQL else sqlite.insert(table)
