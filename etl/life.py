"""Proof of life: a lock that the kernel or the database drops the moment its process dies.

A process that owns work (claims, intents, the leader lease, a job run) holds one for as long as it runs,
and says so in its name (etl.liveness): `:L`, a PostgreSQL session advisory lock keyed on the name, held
on a connection of its own; `:F`, an exclusive `flock` on `<database file>.owners/<token>.lock` beside
the SQLite database (the kernel releases it at process death, and every container sharing the volume
on one kernel sees the same lock). Anyone can ask whether the lock is still held: held means alive,
whatever any other check says; free means dead (etl.recovery.owner_dead).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
from sqlalchemy import Connection, Engine

from etl import liveness
from etl.store import state
from etl.store.dialect import capabilities, database_file

log = structlog.get_logger("etl.life")

OWNERS_SUFFIX = ".owners"


@dataclass
class Life:
    """What this process holds to prove it is alive (one of the two, or nothing)."""

    conn: Connection | None = None  # PostgreSQL: the session holding the advisory lock
    fd: int | None = None  # SQLite: the flocked file
    path: Path | None = None

    def release(self) -> None:
        """At a clean exit: free the lock (and remove our lock file)."""
        if self.fd is not None:
            if self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd, self.path = None, None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.invalidate()  # closes the session (and its lock) instead of pooling it
            self.conn = None


@dataclass(frozen=True)
class Identity:
    """Who this process is (etl.liveness's owner string) and the lock that proves it alive. `hold` returns
    a new one when taking the lock changes the owner string (its `:L` or `:F` suffix)."""

    owner: str = field(default_factory=liveness.new_owner)
    life: Life = field(default_factory=Life)


def owners_dir(engine: Engine) -> Path | None:
    """`<database file>.owners`, beside the SQLite database; None for PostgreSQL or an in-memory one."""
    database = database_file(engine)
    if database is None:
        return None
    # The real file's directory: a process that reaches the database through a symlink must look in the
    # same folder as one that does not.
    return Path(os.path.realpath(database) + OWNERS_SUFFIX)


def hold(engine: Engine, me: Identity) -> Identity:
    """Take the proof of life if not held yet (again, if its PostgreSQL session dropped): `me`, with the
    owner string that says so once held. Never fails: without it, this process's work is recovered when
    its leases run out, as before."""
    life = me.life
    try:
        if capabilities(engine).advisory_locks:
            return replace(me, owner=_hold_advisory(engine, me.owner, life))
        if life.fd is None:
            return replace(me, owner=_hold_flock(engine, me.owner, life))
        return replace(me, owner=liveness.with_flock(me.owner))  # held already: say so in the owner
    except Exception as exc:  # no proof of life: leases are the fallback
        log.warning("liveness_lock_failed", error=str(exc))
    return me


def _hold_advisory(engine: Engine, me: str, life: Life) -> str:
    if life.conn is not None:
        if not life.conn.invalidated and not life.conn.closed:
            return liveness.with_lock(me)  # held already (`me` may be the entry point's bare name)
        with contextlib.suppress(Exception):
            life.conn.invalidate()
        life.conn = None
    conn = engine.connect()
    owner = liveness.with_lock(me)
    if state.hold_owner_lock(conn, owner):
        conn.commit()  # the lock is the session's, not the transaction's
        life.conn = conn
        return owner
    conn.invalidate()
    return me


def _hold_flock(engine: Engine, me: str, life: Life) -> str:
    folder = owners_dir(engine)
    if folder is None or liveness.holds_flock(me):
        return me
    folder.mkdir(exist_ok=True)
    path = folder / f"{liveness.token_of(me)}.lock"
    for attempt in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:  # a stale-file sweep removed it between our open and our flock
            pass
        except OSError:
            os.close(fd)
            raise
        os.close(fd)
        if attempt == 2:
            raise OSError(f"{path} kept being removed while it was being locked")
    life.fd, life.path = fd, path
    _sweep_stale(folder, path)
    return liveness.with_flock(me)


def _sweep_stale(folder: Path, mine: Path) -> None:
    """Lock files of processes that died without anyone asking about them: removed once free."""
    for path in folder.glob("*.lock"):
        if path != mine:
            flock_free(path)


def flock_free(path: Path) -> bool | None:
    """True: nobody holds the lock (its process is dead; the file is removed); False: held, alive;
    None: cannot tell (the file cannot be opened for another reason than its absence)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True  # removed by whoever proved its holder dead (or at its clean exit)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:
        os.close(fd)
        return None
    try:
        with contextlib.suppress(OSError):
            path.unlink()  # while holding the lock: nobody can be proving life with this file now
    finally:
        os.close(fd)
    return True


def owner_flock_free(engine: Engine, owner: str) -> bool | None:
    """Whether `owner`'s flock beside this database is free (see `flock_free`)."""
    folder = owners_dir(engine)
    token = liveness.token_of(owner)
    if folder is None or not token:
        return None
    return flock_free(folder / f"{token}.lock")
