"""Engines for SQLite and PostgreSQL, opened the way the daemon needs them."""

from __future__ import annotations

import os
import sqlite3
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import QueuePool

from etl.config import mask_url
from etl.errors import DatabaseUnreachable, MissingPrivilege, environmental
from etl.store.dialect import capabilities

SQLITE_BUSY_TIMEOUT_S = 60
# SQLite's own defaults: a checkpoint once the WAL holds 1,000 pages. The WAL file left behind after a
# checkpoint is cut back to 64 MiB (by default it keeps whatever size the largest transaction gave it).
SQLITE_WAL_AUTOCHECKPOINT_PAGES = 1000
SQLITE_WAL_SIZE_LIMIT = 64 << 20
# During `bulk_writes`: a checkpoint only once the WAL holds this much.
SQLITE_BULK_WAL_BYTES = 256 << 20
SQLITE_FILE_MODE = 0o600  # a new database file: the service user alone (SQLite has no roles)
SQLITE_DIR_MODE = 0o700  # a folder made for it


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default driver would be psycopg2)."""
    if url.startswith(("postgresql://", "postgres://", "postgres+psycopg://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@contextmanager
def reachable(engine: Engine, what: str = "database") -> Iterator[None]:
    """Translate "could not connect" into one line naming the URL, the failure and what to check.

    Used where a command first touches a database (the schema check, `etl db upgrade`), so a wrong
    port, host or database name is a configuration error, not a driver traceback.
    """
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        # A full disk or a read-only file is no configuration problem: said as what it is, with the exit
        # code systemd restarts (a "cannot connect" here once kept the daemon down after space was freed).
        found = environmental(exc, f"the {what} {_shown(engine)}")
        if found is not None:
            raise found from None
        detail = " ".join(str(exc.orig or exc).split("\n")[0].split())
        raise DatabaseUnreachable(
            f"cannot connect to the {what} {_shown(engine)}: "
            f"{detail or type(exc.orig).__name__}; check the host, port, database name and credentials in "
            f"ETL_DATABASE_URL / ETL_WAREHOUSE_URL or [database] in the config file, and that the server is running"
        ) from None


INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE for "permission denied for table ..."
GRANTS_HINT = "the owner gives the rights with `etl db grants --apply` (docs/deploy.md)"


def denied(exc: BaseException, user: str | None = None) -> MissingPrivilege | None:
    """A "permission denied" from the database as one line naming the user, what was refused and the fix;
    None for any other error (the caller re-raises it)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if getattr(orig, "sqlstate", None) != INSUFFICIENT_PRIVILEGE:
        return None
    detail = " ".join(str(orig).split("\n")[0].split())
    who = f"the database user {user!r}" if user else "the database user"
    return MissingPrivilege(f"{who} lacks a right this needs ({detail}); {GRANTS_HINT}")


def _shown(engine: Engine) -> str:
    return mask_url(_written.get(engine) or engine.url.render_as_string(hide_password=False))


def _decode_text(data: bytes) -> str:
    # Invalid UTF-8 written by a careless INSERT must not make a whole SELECT fail: undecodable bytes become
    # lone surrogates, which the validator then rejects row by row with a readable reason.
    return data.decode("utf-8", "surrogateescape")


# The URL each engine was made from, as the user wrote it (`postgres://...`), for messages.
_written: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    written = url
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=5)
    _written[engine] = written
    return engine


def _create_private(path: Path) -> None:
    """Make a new SQLite file 0600 whatever the umask: whoever reads it reads every document and answer,
    whoever writes it can do anything (SQLite has no roles). Its -wal and -shm files take its mode. An
    existing file keeps the mode its owner gave it (docs/deploy.md says what it must be)."""
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE))


def missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite database file that does not exist yet (None for anything else): opening it
    would create it, which only `etl db upgrade` should do."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:" or Path(database).exists():
        return None
    return database


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    database = parsed.database or ""
    if database and database != ":memory:":
        try:
            Path(database).parent.mkdir(mode=SQLITE_DIR_MODE, parents=True, exist_ok=True)
            _create_private(Path(database))
        except OSError as exc:
            raise DatabaseUnreachable(
                f"cannot create the SQLite database {url} (or its folder): {exc.strerror or exc}; check the "
                "path in ETL_DATABASE_URL or [database] url, and that this user may write there"
            ) from None
    # Pooled, not one connection per transaction: opening a file and running the PRAGMAs below cost about
    # 30 ms per transaction, a tenth of `etl collect` at 100,000 results (bench/RESULTS.md).
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        poolclass=QueuePool,
        pool_size=2,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see below).
        dbapi_connection.isolation_level = None
        dbapi_connection.text_factory = _decode_text
        cur = dbapi_connection.cursor()
        # WAL + synchronous=FULL: a committed batch id survives a power cut, readers never block writers.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_SIZE_LIMIT}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # BEGIN IMMEDIATE takes the write lock up front: two `etl` processes on one file serialise their
        # claims instead of both reading the same queued rows and failing on upgrade (SQLITE_BUSY).
        # Read-only work (see `reading`) begins deferred: it must not hold the write lock while, say, a submit
        # builds a 100k-request batch and its own lease renewal waits for that lock.
        read_only = conn.get_execution_options().get("etl_read_only")
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only: on SQLite its transactions do not take the write lock."""
    with engine.connect() as conn:
        yield conn.execution_options(etl_read_only=True)


@contextmanager
def bulk_writes(engine: Engine) -> Iterator[Connection]:
    """One connection for a run of write transactions that rewrite the same pages: a collect's chunks.

    Results arrive in any order, so each chunk's queue updates dirty pages all over `etl_queue`, and on
    SQLite the checkpoint that ran after every commit copied largely the same pages into the database file
    again at each chunk (with 20,000-result chunks at 100,000 results: 2.2 s of commits, against 1.1 s
    with the checkpoints gathered up; bench/RESULTS.md). Here the WAL is checkpointed only once it holds
    `SQLITE_BULK_WAL_BYTES`, and once more at the end. Each transaction still commits (and is durable) on
    its own. Elsewhere a plain connection: PostgreSQL checkpoints on its own schedule.
    """
    with engine.connect() as conn:
        if not capabilities(conn).own_checkpoints:
            yield conn
            return
        driver: Any = conn.connection.driver_connection
        page_size = int(driver.execute("PRAGMA page_size").fetchone()[0])
        driver.execute(f"PRAGMA wal_autocheckpoint={max(1, SQLITE_BULK_WAL_BYTES // page_size)}")
        try:
            yield conn
        finally:
            try:
                driver.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}")
                driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:  # the connection is unusable: it leaves the pool with its setting
                conn.invalidate()
