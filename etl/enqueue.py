"""`etl enqueue FILE`: JSONL or CSV documents into the queue in bulk, with a progress line.

A file goes in whole or not at all: every block of rows is inserted inside one transaction, committed
after the last line was read and checked. A broken line, a row without `doc_key`/`body` or naming a
task that is not configured stops the load with the line's number, and nothing of the file is kept, so
the fixed file can simply be enqueued again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from sqlalchemy import Connection
from sqlalchemy.exc import DataError, IntegrityError

from etl.clock import parse_iso
from etl.config import Config
from etl.errors import InputError, InputMissing
from etl.store import queue as q
from etl.store.databases import Databases

RESERVED = {"doc_key", "body", "task", "priority", "metadata", "due_by", "mode"}
NOTHING = "nothing from the file was enqueued"

__all__ = ["InputError", "enqueue_file"]


def _records(stream: TextIO, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if fmt == "csv":
        for n, row in enumerate(csv.DictReader(stream), start=2):
            yield n, dict(row)
        return
    for n, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise InputError(f"line {n}: not valid JSON ({exc}); {NOTHING}") from None
        if not isinstance(value, dict):
            raise InputError(f"line {n}: expected a JSON object with doc_key and body; {NOTHING}")
        yield n, value


def unknown_task(task: str, tasks: Any) -> str:
    return f"task {task!r} is not configured (configured tasks: {', '.join(sorted(tasks))})"


def _document(n: int, rec: dict[str, Any], default_task: str | None, tasks: Any) -> dict[str, Any]:
    key = rec.get("doc_key")
    body = rec.get("body")
    if key in (None, "") or body is None:
        raise InputError(
            f"line {n}: needs doc_key and body (got keys: {', '.join(sorted(rec)) or 'none'}); {NOTHING}"
        )
    task = rec.get("task") or default_task or "default"
    if task not in tasks:
        raise InputError(f"line {n} (doc_key {key!r}): {unknown_task(str(task), tasks)}; {NOTHING}")
    meta = rec.get("metadata")
    if isinstance(meta, str) and meta.strip():
        try:
            meta = json.loads(meta)
        except ValueError:
            raise InputError(f"line {n}: metadata is not valid JSON; {NOTHING}") from None
    extra = {k: v for k, v in rec.items() if k not in RESERVED and v not in (None, "")}
    if extra:
        meta = {**extra, **(meta if isinstance(meta, dict) else {})}
    priority = rec.get("priority") or 0
    try:
        priority = int(priority)
    except (TypeError, ValueError):
        raise InputError(f"line {n}: priority must be an integer, got {priority!r}; {NOTHING}") from None
    due_by = rec.get("due_by") or None
    if due_by is not None:
        try:
            due_by = parse_iso(str(due_by))
        except ValueError:
            raise InputError(
                f"line {n}: due_by {due_by!r} is not an ISO 8601 time (e.g. 2026-12-02T15:30:00Z); {NOTHING}"
            ) from None
    mode = rec.get("mode") or None
    if mode not in (None, "live", "batch"):
        raise InputError(f"line {n}: mode must be 'live', 'batch' or empty, got {mode!r}; {NOTHING}")
    return {
        "doc_key": str(key),
        "body": body if isinstance(body, str) else json.dumps(body),
        "task": task,
        "metadata": meta or None,
        "priority": priority,
        "due_by": due_by,
        "mode": mode,
    }


def enqueue_file(
    cfg: Config,
    db: Databases,
    path: str,
    *,
    fmt: str | None,
    default_task: str | None,
    batch_rows: int = 5000,
    progress: TextIO | None = None,
) -> int:
    tasks = cfg.tasks
    if default_task is not None and default_task not in tasks:
        raise InputError(f"--task: {unknown_task(default_task, tasks)}; nothing was enqueued")
    if fmt is None:
        fmt = "csv" if path.lower().endswith(".csv") else "jsonl"
    progress = progress if progress is not None else sys.stderr
    show = progress.isatty()
    stream: TextIO
    total_bytes = 0
    if path == "-":
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="" if fmt == "csv" else None)
    else:
        try:
            stream = open(path, encoding="utf-8", newline="" if fmt == "csv" else None)  # noqa: SIM115
            total_bytes = os.fstat(stream.fileno()).st_size
        except FileNotFoundError:
            raise InputMissing(f"input file {path} does not exist; nothing was enqueued") from None
        except OSError as exc:
            raise InputMissing(f"cannot read {path}: {exc.strerror or exc}; nothing was enqueued") from None
    count = 0
    pending: list[dict[str, Any]] = []
    try:
        # One transaction for the whole file: a bad line anywhere leaves nothing of it in the queue.
        with db.main.begin() as conn:
            for n, rec in _records(stream, fmt):
                pending.append(_document(n, rec, default_task, tasks))
                if len(pending) >= batch_rows:
                    count += _flush(conn, pending)
                    if show:
                        progress.write(f"\rread {count:,} documents of {total_bytes / 1e6:,.1f} MB input...")
                        progress.flush()
            count += _flush(conn, pending)
    except (DataError, IntegrityError) as exc:
        # e.g. PostgreSQL refuses a NUL character in text: said in one line, the file rolled back
        detail = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise InputError(
            f"the database refused a row of the block ending at document {count + len(pending):,}: {detail}; "
            f"{NOTHING}"
        ) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {NOTHING}") from None
    finally:
        if path != "-":
            stream.close()
        if show:
            progress.write(f"\r{' ' * 60}\r")  # the total is printed once, by the command
    return count


def _flush(conn: Connection, docs: list[dict[str, Any]]) -> int:
    if not docs:
        return 0
    n = q.insert_documents(conn, docs)
    docs.clear()
    return n
