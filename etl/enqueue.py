"""`etl enqueue FILE`: JSONL or CSV documents into the queue in bulk, with a progress line."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from etl.clock import parse_iso
from etl.errors import EtlError
from etl.runtime import Runtime
from etl.store import queue as q

RESERVED = {"doc_key", "body", "task", "priority", "metadata", "due_by", "mode"}


class InputError(EtlError):
    exit_code = 65  # EX_DATAERR


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
            raise InputError(
                f"line {n}: not valid JSON ({exc}); nothing after line {n - 1} was enqueued"
            ) from None
        if not isinstance(value, dict):
            raise InputError(f"line {n}: expected a JSON object with doc_key and body")
        yield n, value


def _document(n: int, rec: dict[str, Any], default_task: str | None) -> dict[str, Any]:
    key = rec.get("doc_key")
    body = rec.get("body")
    if key in (None, "") or body is None:
        raise InputError(f"record {n}: needs doc_key and body (got keys: {', '.join(sorted(rec)) or 'none'})")
    meta = rec.get("metadata")
    if isinstance(meta, str) and meta.strip():
        try:
            meta = json.loads(meta)
        except ValueError:
            raise InputError(f"record {n}: metadata is not valid JSON") from None
    extra = {k: v for k, v in rec.items() if k not in RESERVED and v not in (None, "")}
    if extra:
        meta = {**extra, **(meta if isinstance(meta, dict) else {})}
    priority = rec.get("priority") or 0
    try:
        priority = int(priority)
    except (TypeError, ValueError):
        raise InputError(f"record {n}: priority must be an integer, got {priority!r}") from None
    due_by = rec.get("due_by") or None
    if due_by is not None:
        try:
            due_by = parse_iso(str(due_by))
        except ValueError:
            raise InputError(
                f"record {n}: due_by {due_by!r} is not an ISO 8601 time (e.g. 2026-12-02T15:30:00Z)"
            ) from None
    mode = rec.get("mode") or None
    if mode not in (None, "live", "batch"):
        raise InputError(f"record {n}: mode must be 'live', 'batch' or empty, got {mode!r}")
    return {
        "doc_key": str(key),
        "body": body if isinstance(body, str) else json.dumps(body),
        "task": rec.get("task") or default_task or "default",
        "metadata": meta or None,
        "priority": priority,
        "due_by": due_by,
        "mode": mode,
    }


def enqueue_file(
    rt: Runtime,
    path: str,
    *,
    fmt: str | None,
    default_task: str | None,
    batch_rows: int = 5000,
    progress: TextIO | None = None,
) -> int:
    if fmt is None:
        fmt = "csv" if path.lower().endswith(".csv") else "jsonl"
    progress = progress if progress is not None else sys.stderr
    show = progress.isatty()
    total_bytes = Path(path).stat().st_size if path != "-" else 0
    stream: TextIO
    if path == "-":
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="" if fmt == "csv" else None)
    else:
        try:
            stream = open(path, encoding="utf-8", newline="" if fmt == "csv" else None)  # noqa: SIM115
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
    count = 0
    pending: list[dict[str, Any]] = []
    try:
        for n, rec in _records(stream, fmt):
            pending.append(_document(n, rec, default_task))
            if len(pending) >= batch_rows:
                count += _flush(rt, pending)
                if show:
                    progress.write(f"\renqueued {count:,} documents of {total_bytes / 1e6:,.1f} MB input...")
                    progress.flush()
        count += _flush(rt, pending)
    finally:
        if path != "-":
            stream.close()
    if show:
        progress.write(f"\renqueued {count:,} documents, done.{' ' * 30}\n")
    return count


def _flush(rt: Runtime, docs: list[dict[str, Any]]) -> int:
    if not docs:
        return 0
    with rt.engine.begin() as conn:
        n = q.insert_documents(conn, docs)
    docs.clear()
    return n
