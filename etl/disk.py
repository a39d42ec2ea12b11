"""Room to write: the free space where a SQLite database lives, which `etl status --check` reports.

A full disk stops every write, including the one that would record the failure, so status looks at the
disk itself: below `LOW_DISK_BYTES` free, collects and submits are at risk (a collect's WAL grows by the
size of its chunk), and `--check` fails naming the folder until space is freed.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine

from etl.store.databases import Databases
from etl.store.dialect import database_file

LOW_DISK_BYTES = 64 << 20


def sqlite_folder(engine: Engine) -> Path | None:
    """The folder of a SQLite database file (None for PostgreSQL or an in-memory database)."""
    database = database_file(engine)
    return None if database is None else database.resolve().parent


def free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def problems(db: Databases, low: int = LOW_DISK_BYTES) -> list[str]:
    out: list[str] = []
    seen: set[Path] = set()
    for what, engine in (("queue database", db.main), ("warehouse", db.warehouse)):
        folder = sqlite_folder(engine)
        if folder is None or folder in seen:
            continue
        seen.add(folder)
        free = free_bytes(folder)
        if free is not None and free < low:
            out.append(
                f"disk nearly full: {free // 1024:,} KB free in {folder} (the {what}'s folder; at least "
                f"{low >> 20} MB are needed to collect and submit safely); free space there"
            )
    return out
